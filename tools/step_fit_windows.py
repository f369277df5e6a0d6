"""A W3 server's own step times against the step-time fit the simulator replays them with, per QPS window.

usage: python tools/step_fit_windows.py STEPS.jsonl.gz [--calibration NAME] [--model M] [--gap-s S]

Issue 28's out-of-sample check: when a replay misses a measured point, is it the simulator's queueing or the
server's steps? The step trace (`serve --step-trace`, tools/w3_slo.sh's steps.jsonl.gz) holds each step's shape,
its time on the GPU (CUDA events from its first enqueue: host gaps inside the step count in it) and how long the
host then waited for it (wait_s ~ 0: the host was the slower side). Each QPS point of one server process is a
window between idle gaps; per window it prints measured / fitted time (StepCost with the calibration
`--calibration default` takes for the model), over all steps, the steps at >= 200 running, and one steady step
shape (1,200-1,300 tokens, >= 245 sequences: W3 at the knee with --slo-prefill-chunk 1024) with its spread and
the share of those steps in which the host did not wait for the GPU (wait_s < 0.1 ms), with their mean time and
the others'. Where a window has steps past the mixed-step graphs (eager: > 2,048 tokens carrying prefill, as
--slo-prefill-chunk 0 makes them), a line on them: measured, fitted (without and with the fit's eager table,
eager_steps.py) and the engine's own predicted time, the host gap before them (t[i] - t[i-1] - actual[i]), the
GPU's busy share of the window, and how full the running set and the queue were.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from meshserve.engine.step_time import StepShape
from meshserve.planner.hardware import get_gpu
from meshserve.planner.model import load_model
from meshserve.simulator.step_cost import (
    StepCost,
    calibration_for,
    load_calibration,
    load_eager_costs,
    read_step_trace,
)

BUSY_RUNNING = 200  # steps with at least this many running sequences: the server at the knee
SHAPE_TOKENS = (1200, 1300)  # a full prompt chunk (1,024) beside ~250 decodes
SHAPE_MIN_SEQS = 245
EAGER_AFTER_TOKENS = 2048  # the largest mixed step the server replays as a CUDA graph
HOST_BOUND_WAIT_S = 1e-4  # the host read the step back without waiting: it, not the GPU, was late


@dataclass(frozen=True)
class Window:
    """One QPS point's steps: measured and fitted seconds, and the fields the summaries select on."""

    t0: float
    t1: float
    actual: np.ndarray
    fitted: np.ndarray
    tokens: np.ndarray
    seqs: np.ndarray
    context: np.ndarray
    running: np.ndarray
    wait: np.ndarray
    t: np.ndarray
    predicted: np.ndarray  # the engine's own prediction of each step
    waiting: np.ndarray
    with_eager: np.ndarray  # fitted with the fit's eager table (= fitted where it has none)

    @property
    def same_shape(self) -> np.ndarray:
        return (self.tokens >= SHAPE_TOKENS[0]) & (self.tokens <= SHAPE_TOKENS[1]) & (self.seqs >= SHAPE_MIN_SEQS)


def split_windows(rows: list[dict], gap_s: float) -> list[list[dict]]:
    """The trace cut where the server sat idle for more than gap_s (between the client's QPS points)."""
    windows: list[list[dict]] = []
    for r in rows:
        if not windows or r["t"] - windows[-1][-1]["t"] > gap_s:
            windows.append([])
        windows[-1].append(r)
    return windows


def window(rows: list[dict], cost: StepCost, eager_cost: StepCost | None = None) -> Window:
    def col(key: str, default: float | None = None) -> np.ndarray:
        # predicted_s and waiting: traces older than the policy's fields lack them (nan / 0 there)
        return np.array([r[key] if default is None else r.get(key, default) for r in rows])

    def price(c: StepCost) -> np.ndarray:
        return np.array([c(StepShape(r["tokens"], r["seqs"], r["context"])) for r in rows])

    fitted = price(cost)
    return Window(rows[0]["t"], rows[-1]["t"], col("actual_s"), fitted, col("tokens"), col("seqs"), col("context"),
                  col("running"), col("wait_s"), col("t"), col("predicted_s", float("nan")), col("waiting", 0),
                  fitted if eager_cost is None else price(eager_cost))


def ratio(w: Window, mask: np.ndarray) -> float:
    """Measured over fitted time of the selected steps (their sums: the time they took the server)."""
    return float(w.actual[mask].sum() / w.fitted[mask].sum())


def _mean_ms(values_ms: np.ndarray, mask: np.ndarray) -> str:
    return f"{values_ms[mask].mean():.2f}" if mask.any() else "-"


def describe_eager(w: Window, after_tokens: int = EAGER_AFTER_TOKENS) -> str | None:
    """The window's steps past the mixed-step graphs (None: it has none)."""
    eager = (w.seqs < w.tokens) & (w.tokens > after_tokens)
    if not eager.any():
        return None
    gap = np.full(len(w.t), np.nan)
    gap[1:] = np.diff(w.t) - w.actual[1:]
    span = w.t[-1] - w.t[0]
    decode = w.seqs == w.tokens
    return (f"  past the graphs (> {after_tokens} tokens): {eager.sum()} steps, {w.tokens[eager].mean():,.0f} tokens, "
            f"running {w.running[eager].mean():.0f}; measured {w.actual[eager].mean() * 1e3:.1f} ms, fit "
            f"{w.fitted[eager].mean() * 1e3:.1f} ({ratio(w, eager):.3f}), with the eager table "
            f"{w.with_eager[eager].mean() * 1e3:.1f}, the engine's own prediction {w.predicted[eager].mean() * 1e3:.1f}; "
            f"host gap before them {np.nanmean(gap[eager]) * 1e3:.1f} ms ({np.nansum(gap[eager]) / span:.1%} of the "
            f"window); GPU busy {w.actual[1:].sum() / span:.1%}; running p50 {np.median(w.running):.0f} (max "
            f"{w.running.max()}), waiting p50 {np.median(w.waiting):.0f}; {decode.sum()} decode-only steps, "
            f"{(decode & (w.waiting > 0)).sum()} of them with requests waiting")


def describe(w: Window) -> str:
    busy, shape = w.running >= BUSY_RUNNING, w.same_shape
    lines = [(f"t {w.t0:.1f}-{w.t1:.1f} s: {len(w.actual)} steps, measured / fit {ratio(w, np.ones_like(busy)):.3f}; "
              f">= {BUSY_RUNNING} running: {busy.sum()} steps, {ratio(w, busy):.3f}")]
    if shape.any():
        a = w.actual[shape] * 1e3
        host_bound = w.wait[shape] < HOST_BOUND_WAIT_S
        lines.append(f"  {SHAPE_TOKENS[0]}-{SHAPE_TOKENS[1]} tokens, >= {SHAPE_MIN_SEQS} seqs: {shape.sum()} steps, "
                     f"mean context {w.context[shape].mean():,.0f}; measured mean {a.mean():.2f} ms (p10 "
                     f"{np.percentile(a, 10):.2f}, p50 {np.median(a):.2f}, p90 {np.percentile(a, 90):.2f}), fit "
                     f"{w.fitted[shape].mean() * 1e3:.2f} ms: {ratio(w, shape):.3f}; the host did not wait for the "
                     f"GPU in {host_bound.mean():.1%} of them ({_mean_ms(a, host_bound)} ms; "
                     f"{_mean_ms(a, ~host_bound)} ms where it waited)")
    eager = describe_eager(w)
    if eager is not None:
        lines.append(eager)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--gpu", default="H200")
    ap.add_argument("--calibration", default="default")
    ap.add_argument("--gap-s", type=float, default=2.0)
    ns = ap.parse_args()
    section = calibration_for(ns.calibration, ns.model)
    model, gpu, weights = load_model(ns.model), get_gpu(ns.gpu), load_calibration(section)
    cost = StepCost(model, gpu, weights=weights)
    eager = load_eager_costs(section)
    eager_cost = None if eager is None else StepCost(model, gpu, weights=weights, eager=eager)
    print(f"fit: {section}")
    for rows in split_windows(read_step_trace(ns.trace), ns.gap_s):
        print(describe(window(rows, cost, eager_cost)))


if __name__ == "__main__":
    main()
