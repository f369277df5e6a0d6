"""The fast replica model against the reference (the engine's own Scheduler per replica): the accuracy bar.

The bar (issue 28): completed requests, output tokens, refusals and preemptions exact; goodput within 1%;
TTFT/TPOT p50 within 2% and p99 within 5%; inter-token gap percentiles within one histogram bin. On these
configurations the fast model in fact reproduces the reference to rounding (both decide every step the same way;
only the order of floating-point sums differs), so the bar has room to spare.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.metrics import ITL_BIN_S
from meshserve.simulator.trace import SimRequest, poisson_trace

_CASES = {
    # W3 on one H100 below its knee (~48 req/s) and past it (the queue fills: 429s)
    "w3-below-knee": (SimConfig(gpu="H100-SXM"), poisson_trace(30.0, 40.0, 3)),
    "w3-past-knee": (SimConfig(gpu="H100-SXM", max_queue_len=256), poisson_trace(90.0, 20.0, 3)),
    # four replicas behind the least-outstanding router, with the API process's queue
    "fleet-of-4": (
        SimConfig(gpu="H100-SXM", num_gpus=4, frontend_request_s=8.7e-3, frontend_token_s=50e-6),
        poisson_trace(150.0, 20.0, 5),
    ),
    "fleet-round-robin": (
        SimConfig(gpu="H200", num_gpus=3, router="round-robin"),
        poisson_trace(90.0, 10.0, 6),
    ),
    # prompts longer than the token budget: prefilled in chunks over several steps, beside the decodes
    "chunked-prefill": (
        SimConfig(gpu="H100-SXM", max_num_batched_tokens=1024, max_model_len=8192),
        poisson_trace(8.0, 20.0, 4, 3000, 64),
    ),
    # a KV pool of 300 blocks: long outputs preempt (and are recomputed), and prompts are chunked
    "kv-limited": (
        SimConfig(
            gpu="H200", num_blocks=300, max_model_len=1024, max_num_batched_tokens=256, max_num_seqs=32
        ),
        poisson_trace(30.0, 8.0, 2, 256, 400),
    ),
}


def _both(config: SimConfig, trace) -> tuple[dict, dict]:
    fast = simulate(replace(config, replica_model="fast"), trace)
    reference = simulate(replace(config, replica_model="scheduler"), trace)
    assert fast["replica_model"] == "fast" and fast["replica_model_fallback"] is None
    assert reference["replica_model"] == "scheduler"
    return fast, reference


@pytest.mark.parametrize("name", list(_CASES))
def test_fast_model_meets_the_accuracy_bar(name):
    fast, ref = _both(*_CASES[name])
    for key in ("completed", "output_tokens", "rejected", "preemptions", "num_requests"):
        assert fast[key] == ref[key], key
    assert fast["goodput"] == pytest.approx(ref["goodput"], rel=0.01)
    for key in ("ttft_p50", "tpot_p50"):
        assert fast[key] == pytest.approx(ref[key], rel=0.02), key
    for key in ("ttft_p99", "tpot_p99", "e2e_p99"):
        assert fast[key] == pytest.approx(ref[key], rel=0.05), key
    for key in ("itl_p50", "itl_p99"):
        assert abs(fast[key] - ref[key]) <= ITL_BIN_S * 1.001, key
    assert fast["steps"] == ref["steps"]
    assert fast["gpu_busy_fraction"] == pytest.approx(ref["gpu_busy_fraction"], rel=1e-6)
    assert fast["completed"] > 100


def test_the_cases_exercise_what_they_name():
    """The bar means something only if the cases reach the regimes: a queue past the knee, preemption."""
    past = simulate(replace(_CASES["w3-past-knee"][0], replica_model="fast"), _CASES["w3-past-knee"][1])
    assert past["rejected"] > 0 and past["ttft_p50"] > 1.0
    kv = simulate(replace(_CASES["kv-limited"][0], replica_model="fast"), _CASES["kv-limited"][1])
    assert kv["preemptions"] > 10


def test_fast_model_is_deterministic_for_a_seed():
    config = replace(_CASES["fleet-of-4"][0], replica_model="fast")
    a, b = simulate(config, poisson_trace(150.0, 10.0, 7)), simulate(config, poisson_trace(150.0, 10.0, 7))
    a.pop("sim_wall_s"), b.pop("sim_wall_s")
    assert a == b
    c = simulate(config, poisson_trace(150.0, 10.0, 8))
    assert c["ttft_mean"] != a["ttft_mean"]


def test_uncovered_configurations_fall_back_to_the_scheduler(caplog):
    trace = poisson_trace(20.0, 5.0, 1)
    with caplog.at_level(logging.INFO, logger="meshserve.simulator.fleet"):
        report = simulate(SimConfig(gpu="H200", slo_ttft_s=1.0, slo_tpot_s=0.05, replica_model="fast"), trace)
    assert report["replica_model"] == "scheduler"
    assert "SLO" in report["replica_model_fallback"] and "SLO" in caplog.text
    custom = simulate(SimConfig(gpu="H200", replica_model="fast"), trace, step_cost=lambda shape: 0.01)
    assert custom["replica_model"] == "scheduler" and "step cost" in custom["replica_model_fallback"]


def test_one_token_outputs_and_refused_prompts():
    """Edges the segments skip: a prefill that samples the only token (finishes at once), a prompt longer than
    max_model_len (refused like the server's 400), the queue limit behind the router."""
    reqs = [SimRequest(0.01 * i, 100, 1 if i % 3 == 0 else 20) for i in range(60)] + [
        SimRequest(0.7, 5000, 10)
    ]
    config = SimConfig(gpu="H200", num_gpus=2, max_queue_len=4)
    fast, ref = _both(config, reqs)
    assert fast["completed"] == ref["completed"] and fast["rejected"] == ref["rejected"] >= 1
    assert fast["ttft_p99"] == pytest.approx(ref["ttft_p99"], rel=1e-9)
