"""A cross-check of the API process's cost split (simulator/frontend_fit.py) second by second: one-off.

    python tools/frontend_cpu_bins.py RUN[.tgz] [RUN ...]   # w3_slo.sh results with proc_cpu.jsonl, steps.jsonl

The point-level fit cannot split a request's intake from its tokens (W3 streams 128 tokens a request at every
point). Within a point the two move apart: in the first second requests arrive with few tokens out, after the
last arrival tokens stream with no intake. Per second of the CPU log: arrivals (bench serve's own W3 draw,
seed 1000 + QPS, placed by the first step), the engine's prompts started and tokens out (its step trace: a step's
sequences each emit a token; (tokens - seqs) / 511 prompts of 512), and the four API processes' CPU less their
idle rate. Model: cpu = r x admitted + t x tokens + f x refused, admitted being the arrivals in the first second
(nothing refused yet), 0 after the last arrival, the prompts started in between (refused: arrivals less them).
The step trace's clock is aligned to wall time by the engine core's CPU (busy while it has steps).
Biases, stated not corrected: the prompts started stand for the intakes (lagged by the core's queue, noisy: r
pulled low); a stream's first event and its close land on the tokens of the first and last seconds (t pulled
high, r low).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from meshserve.simulator.frontend_fit import api_pids, idle_rate, read_member
from meshserve.simulator.trace import w3_trace

PROMPT_LEN = 512


def bins(run: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per loaded second: (admitted, tokens, refused), API CPU less idle, and its phase (ramp/steady/drain)."""
    rows = [json.loads(x) for x in read_member(run, "proc_cpu.jsonl").splitlines() if x.strip()]
    steps = [json.loads(x) for x in read_member(run, "steps.jsonl").splitlines() if x.strip()]
    points = json.loads(read_member(run, "w3.json"))["points"]
    api = api_pids(rows)
    core = max((p for p in rows[-1]["procs"] if p not in api and "forkserver" in rows[-1]["procs"][p]["process"]),
               key=lambda p: rows[-1]["procs"][p]["cpu_s"])
    tw = np.array([r["t_wall"] for r in rows])
    cpu = np.array([sum(r["procs"][p]["cpu_s"] for p in api if p in r["procs"]) for r in rows])
    core_rate = np.diff([r["procs"][core]["cpu_s"] for r in rows]) / np.diff(tw)
    st = np.array([s["t"] for s in steps])
    seqs = np.array([s["seqs"] for s in steps], dtype=float)
    prompts = np.array([(s["tokens"] - s["seqs"]) / (PROMPT_LEN - 1) for s in steps])
    cuts = [0, *[i for i in range(1, len(st)) if st[i] - st[i - 1] > 1.0], len(st)]
    spans = [(st[a], st[b - 1]) for a, b in zip(cuts, cuts[1:])]
    assert len(spans) == len(points), "one burst of steps per point"

    def coverage(off: float) -> np.ndarray:  # the share of each second the core had steps, at offset off
        out = np.zeros(len(tw) - 1)
        for a, b in spans:
            out += np.clip(np.minimum(tw[1:], b + off) - np.maximum(tw[:-1], a + off), 0, None) / np.diff(tw)
        return out

    offsets = tw[0] - st[0] + np.arange(0.0, tw[-1] - tw[0], 0.01)
    off = offsets[int(np.argmin([np.sum((coverage(o) - core_rate) ** 2) for o in offsets]))]
    idle = idle_rate(rows, api, [(p["wall_start"], p["wall_end"]) for p in points])
    x, y, phase = [], [], []
    for (a, b), p in zip(spans, points):
        arrivals = np.asarray(w3_trace(p["qps"]).arrival_s) + a + off  # the first request starts the first step
        for i in range(len(tw) - 1):
            lo, hi = tw[i], tw[i + 1]
            if hi < a + off or lo > b + off:
                continue
            inside = (st + off >= lo) & (st + off < hi)
            arrived = float(((arrivals >= lo) & (arrivals < hi)).sum())
            started, tokens = prompts[inside].sum(), seqs[inside].sum()
            if hi <= a + off + 1.0:
                ph, admitted, refused = "ramp", arrived, 0.0
            elif lo >= arrivals[-1]:
                ph, admitted, refused = "drain", 0.0, 0.0
            else:
                ph, admitted, refused = "steady", started, max(arrived - started, 0.0)
            x.append([admitted, tokens, refused])
            y.append(cpu[i + 1] - cpu[i] - idle * (hi - lo))
            phase.append(ph)
    return np.array(x), np.array(y), phase


def main(runs: list[str]) -> None:
    parts = [bins(Path(r)) for r in runs]
    x = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    phase = np.array([ph for p in parts for ph in p[2]])
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    res = y - x @ coef
    se = np.sqrt(res @ res / (len(y) - 3) * np.diag(np.linalg.inv(x.T @ x)))
    corr = np.corrcoef(x[:, 0], x[:, 1])[0, 1]
    print(f"{len(y)} seconds ({(phase == 'ramp').sum()} ramp, {(phase == 'drain').sum()} drain); admitted vs "
          f"tokens correlation {corr:.2f}")
    print(f"per request {coef[0] * 1e3:.2f} +- {se[0] * 1e3:.2f} ms, per token {coef[1] * 1e6:.1f} +- "
          f"{se[1] * 1e6:.1f} us, per 429 {coef[2] * 1e3:.2f} +- {se[2] * 1e3:.2f} ms; per admitted request with "
          f"128 tokens {(coef[0] + 128 * coef[1]) * 1e3:.2f} ms")
    edge = phase != "steady"
    r, t = np.linalg.lstsq(x[edge][:, :2], y[edge], rcond=None)[0]
    print(f"ramp and drain seconds alone: per request {r * 1e3:.2f} ms, per token {t * 1e6:.1f} us")


if __name__ == "__main__":
    main(sys.argv[1:])
