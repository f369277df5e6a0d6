"""Whether the engine's steps were host-bound or device-bound in each phase of a benchmark, from a step trace.

usage: python tools/step_trace_phases.py STEPS.jsonl PHASES.txt

STEPS.jsonl: `meshserve serve --step-trace FILE` (a JSON line per step: "t" monotonic time when the host read
the step back, "actual_s" its device time, "wait_s" how long the host waited for it then, "seqs", "masked_rows"
the rows under grammar masks). PHASES.txt: a line "NAME START END" per benchmark phase (time.monotonic(), the
same clock on one machine). For each phase and batch class (1, 2-47, 48+ sequences) it prints the steps, the
median period between reads (the engine's step time), the device time, the host's wait, and the share of steps
where the host did not wait (< 0.1 ms: the device sat idle waiting for the host; host-bound), so a slower
step under grammars reads off as host time (wait ~0, period > device time) or as device time.
"""

from __future__ import annotations

import json
import statistics
import sys


def batch_class(seqs: int) -> str:
    return "1" if seqs <= 1 else "2-47" if seqs < 48 else "48+"


def summarize(steps: list[dict], phases: list[tuple[str, float, float]]) -> list[dict]:
    steps = sorted(steps, key=lambda s: s["t"])
    rows = []
    for name, start, end in phases:
        groups: dict[str, list[tuple[dict, float]]] = {}
        prev = None
        for s in steps:
            if start <= s["t"] <= end and prev is not None and start <= prev["t"]:
                groups.setdefault(batch_class(s["seqs"]), []).append((s, s["t"] - prev["t"]))
            prev = s
        for cls, items in sorted(groups.items()):
            waits = [s.get("wait_s", 0.0) for s, _ in items]
            rows.append({
                "phase": name, "batch": cls, "steps": len(items),
                "seqs_mean": statistics.mean(s["seqs"] for s, _ in items),
                "masked_share": sum(1 for s, _ in items if s.get("masked_rows")) / len(items),
                "period_ms": statistics.median(p for _, p in items) * 1e3,
                "device_ms": statistics.median(s["actual_s"] for s, _ in items) * 1e3,
                "wait_ms": statistics.median(waits) * 1e3,
                "host_bound_share": sum(1 for w in waits if w < 1e-4) / len(items),
            })
    return rows


def main() -> None:
    steps = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    phases = []
    for line in open(sys.argv[2]):
        if line.strip():
            name, start, end = line.split()
            phases.append((name, float(start), float(end)))
    print("| phase | batch | steps | seqs | masked steps | period ms p50 | device ms p50 | host wait ms p50 | "
          "steps the host did not wait |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in summarize(steps, phases):
        print(f"| {r['phase']} | {r['batch']} | {r['steps']} | {r['seqs_mean']:.1f} | {r['masked_share']:.0%} | "
              f"{r['period_ms']:.2f} | {r['device_ms']:.2f} | {r['wait_ms']:.2f} | {r['host_bound_share']:.0%} |")


if __name__ == "__main__":
    main()
