"""Where a window of steps loses GPU time: idle gaps between kernels and the host work that launched late.

usage: python tools/trace_gaps.py TRACE.json [--min-gap-us 20] [--top 15]

TRACE is a torch.profiler Chrome trace (MESHSERVE_PROFILE_DIR writes one per rank: engine/step_profiler.py).
The GPU's kernels and copies are merged into busy intervals; every idle gap longer than --min-gap-us is charged
to the launch that ended it (the runtime call with the same correlation id as the first kernel after the gap)
and to the innermost host operation around that call, so "the GPU waited 2.1 ms for cudaGraphLaunch issued
inside EngineCore._schedule" reads off directly. Also: busy fraction, steps (graph launches), and the kernels
with the most GPU time.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import itertools
import json
from dataclasses import dataclass

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "user_annotation", "python_function")


@dataclass
class Gap:
    start_us: float
    dur_us: float
    launch: str  # the runtime call that enqueued the work ending the gap
    host_op: str  # the innermost host op around that call ("-" if none was recorded)
    next_kernel: str


def _events(trace: dict) -> list[dict]:
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]


def busy_intervals(device: list[dict]) -> list[tuple[float, float]]:
    """Union of the device events' [ts, ts + dur] intervals, sorted."""
    merged: list[list[float]] = []
    for e in sorted(device, key=lambda e: e["ts"]):
        s, t = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], t)
        else:
            merged.append([s, t])
    return [(s, t) for s, t in merged]


def _innermost(host: list[dict], starts: list[float], ts: float) -> str:
    """Name of the shortest host op whose interval holds ts (host sorted by start)."""
    best = None
    for e in reversed(host[: bisect.bisect_right(starts, ts)]):
        if e["ts"] + e["dur"] >= ts and (best is None or e["dur"] < best["dur"]):
            best = e
        if ts - e["ts"] > 5e6:  # ops are nested within a step: nothing older than 5 s holds ts
            break
    return best["name"] if best else "-"


def analyse(trace: dict, min_gap_us: float = 20.0) -> dict:
    events = _events(trace)
    device = [e for e in events if e.get("cat") in DEVICE_CATS]
    if not device:
        raise SystemExit("no GPU events in the trace (a CPU-only profile?)")
    runtime = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    host = sorted((e for e in events if e.get("cat") in HOST_CATS), key=lambda e: e["ts"])
    host_starts = [e["ts"] for e in host]
    device.sort(key=lambda e: e["ts"])
    dev_starts = [e["ts"] for e in device]

    busy = busy_intervals(device)
    span = busy[-1][1] - busy[0][0]
    busy_us = sum(t - s for s, t in busy)
    gaps: list[Gap] = []
    for (_, end), (nxt, _) in itertools.pairwise(busy):
        if nxt - end < min_gap_us:
            continue
        first = device[bisect.bisect_left(dev_starts, nxt)]
        call = runtime.get(first.get("args", {}).get("correlation"))
        launch = call["name"] if call else "?"
        host_op = _innermost(host, host_starts, call["ts"]) if call else "-"
        gaps.append(Gap(end, nxt - end, launch, host_op, first["name"]))

    kernels = collections.Counter()
    for e in device:
        kernels[e["name"]] += e["dur"]
    by_cause = collections.Counter()
    for g in gaps:
        by_cause[f"{g.launch} in {g.host_op}"] += g.dur_us
    steps = sum(1 for e in runtime.values() if e["name"] == "cudaGraphLaunch")
    return {
        "span_us": span,
        "busy_us": busy_us,
        "busy_frac": busy_us / span if span else 0.0,
        "graph_launches": steps,
        "gaps": gaps,
        "gap_us": sum(g.dur_us for g in gaps),
        "gaps_by_cause": by_cause,
        "kernels": kernels,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--min-gap-us", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=15)
    ns = ap.parse_args(argv)
    with open(ns.trace) as f:
        r = analyse(json.load(f), ns.min_gap_us)
    print(
        f"window {r['span_us'] / 1e3:.2f} ms of GPU time line, busy {r['busy_us'] / 1e3:.2f} ms "
        f"({100 * r['busy_frac']:.1f}%), {r['graph_launches']} graph launches; "
        f"{len(r['gaps'])} gaps >= {ns.min_gap_us:g} us = {r['gap_us'] / 1e3:.2f} ms"
    )
    print("\nidle time by what ended it (launch in host op):")
    for cause, us in r["gaps_by_cause"].most_common(ns.top):
        print(f"  {us / 1e3:9.3f} ms  {cause}")
    print("\nlongest gaps:")
    for g in sorted(r["gaps"], key=lambda g: -g.dur_us)[: ns.top]:
        print(
            f"  {g.dur_us / 1e3:8.3f} ms at +{(g.start_us - r['gaps'][0].start_us) / 1e3:9.2f} ms  "
            f"{g.launch} in {g.host_op} -> {g.next_kernel[:60]}"
        )
    print("\nkernels by GPU time:")
    for name, us in r["kernels"].most_common(ns.top):
        print(f"  {us / 1e3:9.3f} ms  {100 * us / r['busy_us']:5.1f}%  {name[:90]}")


if __name__ == "__main__":
    main()
