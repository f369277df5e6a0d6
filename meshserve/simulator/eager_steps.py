"""Mixed steps past the engine's mixed-step CUDA graphs (eager steps), priced beyond the linear step-time fit.

A step-time fit (step_cost.py) is made on the steps its trace holds; W3 with `--slo-prefill-chunk 1024` never
leaves the captured mixed graphs (<= 2,048 tokens). With `--slo-prefill-chunk 0` the TPOT budget fills steps with
up to 8,192 prompt tokens, which run eagerly, and the twenty-third session's Qwen3-0.6B trace
(benchmarks/results/h200_1202_s23/w3_c0/steps.jsonl.gz) shows two costs the fit does not have:
- device: the step's measured time (CUDA events from its first enqueue, so the eager launches count in it) is
  above the fit by ~0.6 us per token, about the same per token from 2,049 to 8,192 tokens. The engine's own online
  model, refitted as it goes, predicted these steps within 1.3%, so the scheduler's budget sees this term
  (EagerStepModel: the policy's predictor is the device cost);
- host: before such a step the GPU idles while the core prepares it (~1.3 us per token, 8 ms on a 6,500-token
  step; ~0 before graphed steps). The engine's step model does not count it (its TPOT budget is device time), so
  the steps come further apart than the budget planned: it lengthens the step in simulated time, not in the
  policy's prediction, and not in the GPU's busy time.
fit_eager_costs refits both from a trace; calibration.toml's `[<fit>.eager]` table holds them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from meshserve.engine.step_time import StepShape, StepTimeModel


@dataclass(frozen=True)
class EagerStepCosts:
    """after_tokens: the largest mixed step the engine replays as a graph; per token of a step past it that
    carries prefill, device_token_us more device time and host_token_us of host time before it."""

    after_tokens: int
    device_token_us: float
    host_token_us: float

    def applies(self, num_tokens: int, num_seqs: int) -> bool:
        return num_seqs < num_tokens > self.after_tokens

    def device_s(self, num_tokens: int, num_seqs: int) -> float:
        return self.device_token_us * 1e-6 * num_tokens if self.applies(num_tokens, num_seqs) else 0.0

    def host_s(self, num_tokens: int, num_seqs: int) -> float:
        return self.host_token_us * 1e-6 * num_tokens if self.applies(num_tokens, num_seqs) else 0.0


def eager_costs_of(entry: dict) -> EagerStepCosts | None:
    """The `eager` table of a calibration entry (step_cost.calibration_entry), None where it has none."""
    table = entry.get("eager")
    if table is None:
        return None
    return EagerStepCosts(int(table["after_tokens"]), float(table["device_token_us"]), float(table["host_token_us"]))


class EagerStepModel(StepTimeModel):
    """StepTimeModel plus the eager steps' device term: what the engine's online model converges to on them
    (max_prefill_tokens and the policy's other predictions go through predict)."""

    def __init__(self, *args, eager: EagerStepCosts, **kwargs):
        super().__init__(*args, **kwargs)
        self.eager = eager

    def predict(self, shape: StepShape) -> float:
        base = super().predict(shape)
        return base + self.eager.device_s(shape.num_tokens, shape.num_seqs) if base > 0 else base


def fit_eager_costs(rows: list[dict], cost, after_tokens: int,
                    idle_interval_s: float = 1.0) -> tuple[EagerStepCosts, int]:
    """Per-token costs of a trace's eager steps (past after_tokens, carrying prefill) against `cost` (a StepCost
    without eager costs): least squares through 0 of (measured - fitted) device time and of the host gap before
    each (t[i] - t[i-1] - actual[i], as step_noise.py; gaps across idle periods left out). Returns the costs and
    the number of eager steps they rest on."""
    dev_x, dev_y, gap_x, gap_y = [], [], [], []
    for i, r in enumerate(rows):
        if not (r["seqs"] < r["tokens"] > after_tokens):
            continue
        dev_x.append(r["tokens"])
        dev_y.append(r["actual_s"] - cost(StepShape(r["tokens"], r["seqs"], r["context"])))
        if i > 0 and 0 < r["t"] - rows[i - 1]["t"] < idle_interval_s:
            gap_x.append(r["tokens"])
            gap_y.append(r["t"] - rows[i - 1]["t"] - r["actual_s"])
    if not dev_x:
        return EagerStepCosts(after_tokens, 0.0, 0.0), 0

    def per_token_us(x: list, y: list) -> float:
        xa = np.asarray(x, dtype=float)
        return float(xa @ np.asarray(y) / (xa @ xa)) * 1e6 if x else 0.0

    return EagerStepCosts(after_tokens, per_token_us(dev_x, dev_y), per_token_us(gap_x, gap_y)), len(dev_x)


def _main() -> None:
    """refit: python -m meshserve.simulator.eager_steps TRACE [CALIBRATION] [MODEL] [AFTER]"""
    from meshserve.planner.hardware import get_gpu
    from meshserve.planner.model import load_model
    from meshserve.simulator.step_cost import StepCost, calibration_for, load_calibration, read_step_trace

    model_name = sys.argv[3] if len(sys.argv) > 3 else "qwen3-0.6b"
    section = calibration_for(sys.argv[2] if len(sys.argv) > 2 else "default", model_name)
    base = StepCost(load_model(model_name), get_gpu("H200"), weights=load_calibration(section))
    rows = read_step_trace(sys.argv[1])
    costs, n = fit_eager_costs(rows, base, int(sys.argv[4]) if len(sys.argv) > 4 else 2048)
    print(f"# {n} eager steps against {section}\nafter_tokens = {costs.after_tokens}\n"
          f"device_token_us = {costs.device_token_us:.3f}\nhost_token_us = {costs.host_token_us:.3f}")
    lo = costs.after_tokens + 1
    for hi in (4000, 6000, 7500, 8193):  # is the device term per token the same across sizes?
        part = [r for r in rows if lo <= r["tokens"] < hi]
        if part:
            by_bin, m = fit_eager_costs(part, base, costs.after_tokens)
            print(f"# {lo}-{hi - 1} tokens: {m} steps, device {by_bin.device_token_us:.2f} us per token")
        lo = hi


if __name__ == "__main__":
    from meshserve.simulator.script_main import run_script

    run_script(_main, "meshserve.simulator.eager_steps")
