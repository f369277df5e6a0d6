"""Eager mixed steps (past the mixed-step graphs): their device and host costs beyond the linear step-time fit."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshserve.engine.step_time import StepShape
from meshserve.planner.hardware import get_gpu
from meshserve.planner.model import load_model
from meshserve.simulator import fleet
from meshserve.simulator.config import SimConfig
from meshserve.simulator.eager_steps import EagerStepCosts, fit_eager_costs
from meshserve.simulator.step_cost import (
    StepCost,
    calibration_entry,
    load_calibration,
    load_eager_costs,
    read_step_trace,
)
from meshserve.simulator.trace import SimRequest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
QWEN_FIT = "h200_qwen3_0_6b"
EAGER = EagerStepCosts(after_tokens=2048, device_token_us=0.5, host_token_us=1.5)


def _qwen_cost(eager: EagerStepCosts | None) -> StepCost:
    return StepCost(load_model("qwen3-0.6b"), get_gpu("H200"), weights=load_calibration(QWEN_FIT), eager=eager)


def test_only_mixed_steps_past_the_graphs_pay():
    assert EAGER.applies(2049, 100)
    assert not EAGER.applies(2048, 100)  # the largest graphed mixed step
    assert not EAGER.applies(4096, 4096)  # decode-only
    assert EAGER.device_s(4000, 900) == pytest.approx(4000 * 0.5e-6)
    assert EAGER.host_s(4000, 900) == pytest.approx(4000 * 1.5e-6)
    assert EAGER.device_s(1024, 2) == EAGER.host_s(1024, 2) == 0.0


def test_step_cost_adds_the_device_term_where_the_policy_sees_it_and_the_host_term_apart():
    plain, eager = _qwen_cost(None), _qwen_cost(EAGER)
    big, graphed, decode = StepShape(6000, 900, 500_000), StepShape(2000, 900, 500_000), StepShape(900, 900, 500_000)
    assert eager(big) - plain(big) == pytest.approx(6000 * 0.5e-6)
    assert eager(graphed) == plain(graphed) and eager(decode) == plain(decode)
    # the policy predicts with the model: the converged engine's prediction carries the device term
    assert eager.model.predict(big) == eager(big)
    # the fast replica's price and the reference's: the same floats
    for s in (big, graphed, decode):
        assert eager.time_s(s.num_tokens, s.num_seqs, s.context_tokens) == eager(s)
    assert eager.host_s(big) == eager.host_time_s(6000, 900) == pytest.approx(6000 * 1.5e-6)
    assert eager.host_s(graphed) == plain.host_s(big) == 0.0
    # a TPOT budget that reaches past the graphs takes fewer prompt tokens when they cost more
    budget = plain.model.predict(StepShape(900 + 5000, 901, 500_000 + 5000))
    assert eager.model.max_prefill_tokens(budget, 900, 500_000, 8192) < plain.model.max_prefill_tokens(
        budget, 900, 500_000, 8192)


def test_fit_recovers_the_per_token_costs_of_a_synthetic_trace():
    """A trace laid out from known costs: device time = fit + device term, the next step starting after the
    host term; decode-only and graphed steps and an idle gap between points are left out of the fit."""
    plain, truth = _qwen_cost(None), _qwen_cost(EAGER)
    shapes = [(900, 900, 400_000), (3000, 950, 420_000), (1800, 900, 400_000), (8192, 700, 380_000),
              (5000, 920, 430_000), (900, 900, 450_000)]
    rows, t = [], 0.0
    for i, (tokens, seqs, context) in enumerate(shapes * 2):
        shape = StepShape(tokens, seqs, context)
        t += truth.host_s(shape) + truth(shape) + (5.0 if i == len(shapes) else 0.0)  # an idle gap once
        rows.append({"t": t, "tokens": tokens, "seqs": seqs, "context": context, "actual_s": truth(shape)})
    fitted, n = fit_eager_costs(rows, plain, 2048)
    assert n == 6
    assert fitted.device_token_us == pytest.approx(0.5, rel=1e-9)
    assert fitted.host_token_us == pytest.approx(1.5, rel=1e-9)


def test_the_qwen_fits_eager_table_is_its_traces_refit():
    """calibration.toml's [h200_qwen3_0_6b.eager] from the twenty-third session's --slo-prefill-chunk 0 trace."""
    stored = load_eager_costs(QWEN_FIT)
    entry = calibration_entry(QWEN_FIT)["eager"]
    rows = read_step_trace(RESULTS / entry["source"].split(" ")[0].removeprefix("benchmarks/results/"))
    fitted, n = fit_eager_costs(rows, _qwen_cost(None), stored.after_tokens)
    assert n > 1000
    assert fitted.device_token_us == pytest.approx(stored.device_token_us, abs=5e-4)
    assert fitted.host_token_us == pytest.approx(stored.host_token_us, abs=5e-4)
    assert load_eager_costs("h200_mixed_graphs") is None  # the 8B's fit: no eager steps measured


@pytest.mark.parametrize("replica_model", ["scheduler", "fast"])
def test_the_host_term_lengthens_the_run_not_the_gpus_busy_time(monkeypatch, replica_model):
    """Eight 1,024-token prompts at once: one 8,192-token step past the graphs, then decodes. With the eager
    table the run ends later by its device and host terms; the GPU's busy time grows by the device term only."""
    trace = [SimRequest(0.0, 1024, 4) for _ in range(8)]

    def run(eager: EagerStepCosts | None) -> dict:
        monkeypatch.setattr(fleet, "load_eager_costs", lambda fit: eager)
        report = fleet.simulate(SimConfig(model="qwen3-0.6b", gpu="H200", replica_model=replica_model), trace)
        assert report["replica_model"] == replica_model
        return report

    plain, eager = run(None), run(EAGER)
    device, host = EAGER.device_s(8192, 8), EAGER.host_s(8192, 8)
    busy = {k: r["gpu_busy_fraction"] * r["duration_s"] for k, r in (("plain", plain), ("eager", eager))}
    assert eager["duration_s"] - plain["duration_s"] == pytest.approx(device + host, rel=1e-6)
    assert busy["eager"] - busy["plain"] == pytest.approx(device, rel=1e-6)


def test_the_chunk_0_runs_windows_refit_apart_and_hold_the_gpu_busy_share_the_trace_shows():
    """validation_qwen's chunk-0 table: the trace of the twenty-third session's run splits into its two measured
    points; the host gap before the eager steps was larger at QPS 256 (the GPU ~75% busy) than at 384 (~92%)."""
    from meshserve.simulator import validation_qwen as vq

    windows, own = vq.chunk0_windows(), vq.window_eager_costs()
    assert sorted(windows) == sorted(own) == [256.0, 384.0]
    assert own[256.0].host_token_us > 3 * own[384.0].host_token_us
    assert vq.gpu_busy(windows[256.0]) < 0.8 < 0.9 < vq.gpu_busy(windows[384.0])
    stored = load_eager_costs(QWEN_FIT)  # the whole trace's: between the two windows'
    assert own[384.0].host_token_us < stored.host_token_us < own[256.0].host_token_us
