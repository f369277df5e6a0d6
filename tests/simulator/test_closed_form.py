"""The simulator against queueing and batching cases with known answers."""

from __future__ import annotations

import dataclasses

import pytest

from meshserve.engine.step_time import StepShape
from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.step_cost import StepCost, load_calibration
from meshserve.simulator.trace import SimRequest, poisson_trace


def _one_at_a_time(**kw) -> SimConfig:
    return SimConfig(gpu="H200", num_gpus=1, max_num_seqs=1, num_blocks=4096, **kw)


def test_md1_queue_mean_wait():
    """One server, one request at a time, each a single step of fixed length D (a one-token output: its prefill
    samples it), Poisson arrivals: an M/D/1 queue, whose mean wait is rho D / (2 (1 - rho)) (Pollaczek-Khinchine)."""
    d, qps = 0.01, 60.0  # rho = 0.6
    trace = poisson_trace(qps, 400.0, seed=7, input_len=64, output_len=1)
    report = simulate(_one_at_a_time(), trace, step_cost=lambda shape: d)
    rho = qps * d
    expected_wait = rho * d / (2 * (1 - rho))
    assert report["completed"] == len(trace) > 20000
    # TTFT = wait + service; the sample mean over 24k correlated waits is within a few percent of theory
    assert report["ttft_mean"] - d == pytest.approx(expected_wait, rel=0.06)
    assert report["gpu_busy_fraction"] == pytest.approx(rho, rel=0.03)
    # Little's law: in flight = arrival rate x time in the system (here the TTFT: one token)
    assert report["in_flight_mean"] == pytest.approx(qps * report["ttft_mean"], rel=0.02)


def test_md1_is_stable_only_below_capacity():
    """rho > 1: the queue grows without bound, so waits grow with the run (no steady state)."""
    d = 0.01
    trace = poisson_trace(150.0, 20.0, seed=1, input_len=64, output_len=1)
    report = simulate(_one_at_a_time(max_queue_len=10**9), trace, step_cost=lambda shape: d)
    # served at 100/s: the last of ~3,000 requests waits ~ (3000 - 2000) x 10 ms
    assert report["duration_s"] == pytest.approx(len(trace) * d, rel=0.01)
    assert report["ttft_p99"] > 5.0


def test_fixed_batch_constant_steps():
    """N requests at t=0, prompts fitting one step: one prefill step yields every first token, then O-1 decode
    steps; with a constant step time D everyone finishes at O x D, TTFT = D, TPOT = D."""
    d, n, out = 0.02, 16, 50
    trace = [SimRequest(0.0, 100, out) for _ in range(n)]
    report = simulate(SimConfig(gpu="H200", num_blocks=4096), trace, step_cost=lambda shape: d)
    assert report["steps"] == out
    assert report["ttft_p50"] == pytest.approx(d) and report["ttft_p99"] == pytest.approx(d)
    assert report["tpot_p50"] == pytest.approx(d)
    assert report["e2e_p99"] == pytest.approx(out * d)
    assert report["goodput"] == pytest.approx(n / (out * d))
    # every request in flight from t = 0 to the end: Little's law gives n
    assert report["in_flight_mean"] == pytest.approx(n) and report["in_flight_per_replica"] == pytest.approx(n)


def test_fixed_batch_calibrated_steps_sum_by_hand():
    """Same batch with the calibrated step cost: the run lasts the prefill step plus O-1 decode steps whose KV
    context grows by one token per sequence per step, each priced by StepCost on its own shape."""
    n, prompt, out = 8, 300, 40
    config = SimConfig(gpu="H100-SXM", num_blocks=4096)
    cost = StepCost(config.model_spec(), config.gpu_spec(), weights=load_calibration(config.calibration_section))
    expected = cost(StepShape(n * prompt, n, n * prompt))
    # decode step k (1..O-1) computes the K/V of token prompt + k - 1, after which each sequence holds prompt + k
    expected += sum(cost(StepShape(n, n, n * (prompt + k))) for k in range(1, out))
    report = simulate(config, [SimRequest(0.0, prompt, out) for _ in range(n)])
    assert report["e2e_p50"] == pytest.approx(expected, rel=1e-9)
    assert report["ttft_p50"] == pytest.approx(cost(StepShape(n * prompt, n, n * prompt)), rel=1e-9)


def test_chunked_prefill_splits_a_long_prompt():
    """A prompt longer than the token budget is prefilled in ceil(P / budget) steps before its first token."""
    d = 0.005
    report = simulate(SimConfig(gpu="H200", num_blocks=4096, max_num_batched_tokens=256),
                      [SimRequest(0.0, 1000, 3)], step_cost=lambda shape: d)
    assert report["ttft_p50"] == pytest.approx(4 * d)
    assert report["steps"] == 4 + 2


def test_kv_pressure_preempts_and_still_finishes():
    """Too few KV blocks for everyone's full length: the real block manager preempts (recompute) and every
    request still completes with its full output."""
    trace = [SimRequest(0.0, 64, 200) for _ in range(8)]
    report = simulate(SimConfig(gpu="H200", num_blocks=60, max_model_len=512), trace,
                      step_cost=lambda shape: 0.01)
    assert report["preemptions"] > 0
    assert report["completed"] == 8 and report["output_tokens"] == 8 * 200


def test_goodput_tpot_and_refusals_by_hand():
    """Steps of 0.1 s, one sequence at a time, a queue of one: of four 5-token requests at t=0 the first runs
    (TTFT 0.1, TPOT 0.4 / 4 = 0.1, done at 0.5 s) and three are refused (failed, never good); a one-token
    request has no TPOT and is good on its TTFT alone."""
    config = SimConfig(gpu="H200", num_gpus=1, num_blocks=4096, max_num_seqs=1, max_queue_len=1,
                       frontend_request_s=0.0, frontend_token_s=0.0, goodput_tpot_s=0.05)
    report = simulate(config, [SimRequest(0.0, 100, 5) for _ in range(4)], step_cost=lambda shape: 0.1)
    assert (report["completed"], report["failed"], report["rejected"]) == (1, 3, 3)
    assert report["tpot_p50"] == pytest.approx(0.1) and report["goodput"] == 0.0  # TPOT 0.1 > 0.05
    loose = simulate(dataclasses.replace(config, goodput_tpot_s=0.11), [SimRequest(0.0, 100, 5)] * 4,
                     step_cost=lambda shape: 0.1)
    assert loose["goodput"] == pytest.approx(1 / 0.5)
    one = simulate(config, [SimRequest(0.0, 100, 1)], step_cost=lambda shape: 0.1)
    assert one["goodput"] == pytest.approx(1 / 0.1) and one["itl_gaps"] == 0
