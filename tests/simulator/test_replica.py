"""Replica details: decode runs change nothing but speed, the server's admission rules, the front end's delay."""

from __future__ import annotations

import pytest

from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.trace import SimRequest, poisson_trace, shared_prefix_trace


def _without_timing(report: dict) -> dict:
    report = dict(report)
    report.pop("sim_wall_s")
    report["gpu_busy_fraction"] = round(report["gpu_busy_fraction"], 9)  # summed in another order
    report["frontend"] = {**report["frontend"], "busy_fraction": round(report["frontend"]["busy_fraction"], 9)}
    return report


@pytest.mark.parametrize("config, trace", [
    (SimConfig(gpu="H100-SXM", num_gpus=4), poisson_trace(64.0, 15.0, 3)),
    (SimConfig(gpu="H200", slo_ttft_s=1.0, slo_tpot_s=0.05), poisson_trace(70.0, 15.0, 4)),
    (SimConfig(gpu="H100-SXM", num_gpus=3, router="prefix-affinity", num_blocks=700),
     shared_prefix_trace(poisson_trace(20.0, 10.0, 1, input_len=2048), 12, 2000, 1)),
    (SimConfig(gpu="H200", num_blocks=300, max_model_len=1024), poisson_trace(30.0, 5.0, 2, 256, 400)),
    # the API process's queue: tokens of decode runs delivered lazily, in order; saturated with targets
    (SimConfig(gpu="H100-SXM", num_gpus=2, frontend_request_s=3e-3, frontend_token_s=60e-6),
     poisson_trace(50.0, 8.0, 6, 300, 90)),
    (SimConfig(gpu="H200", slo_ttft_s=1.0, slo_tpot_s=0.05, frontend_request_s=8.7e-3, frontend_token_s=50e-6),
     poisson_trace(96.0, 8.0, 8)),
    (SimConfig(gpu="H200", frontend_request_s=8.7e-3, frontend_token_s=50e-6, api_server_count=3),
     poisson_trace(80.0, 5.0, 9)),
])
def test_decode_runs_give_the_same_report_as_every_step(config, trace):
    """Fast forward (decode runs laid out at once across finishes, sequences as counts, a counting block
    manager) against the reference (every step through the scheduler, the engine's Sequence and BlockManager):
    the same report, inter-token gap counts and percentiles included."""
    fast = simulate(config, trace, fast_forward=True)
    slow = simulate(config, trace, fast_forward=False)
    assert _without_timing(fast) == _without_timing(slow)
    assert fast["completed"] > 100 and fast["itl_gaps"] > 50 * fast["completed"]


def test_slo_admission_keeps_admitted_requests_in_their_target():
    """Far past capacity: without targets everyone waits (TTFT grows to seconds); with them the server refuses
    or sheds what it cannot serve in time, and the rest keep TTFT near the target and TPOT under it."""
    trace = poisson_trace(150.0, 20.0, 5)
    plain = simulate(SimConfig(gpu="H100-SXM"), trace)
    slo = simulate(SimConfig(gpu="H100-SXM", slo_ttft_s=1.0, slo_tpot_s=0.05), trace)
    assert plain["ttft_p50"] > 3.0 and plain["failed"] < slo["failed"]
    assert slo["rejected"] + slo["shed"] == slo["failed"] > 0
    assert slo["ttft_p99"] < 1.3 and slo["tpot_p99"] < 0.05
    assert slo["goodput"] > 3 * plain["goodput"]


def test_queue_limit_refuses_and_router_retries_elsewhere():
    """A full queue answers 429; behind the router a refused request tries another replica first. All 40
    arrive in one instant, before any step: each replica queues max_queue_len of them."""
    burst = [SimRequest(0.0, 512, 16) for _ in range(40)]
    one = simulate(SimConfig(gpu="H200", max_queue_len=10), burst, step_cost=lambda s: 0.01)
    assert (one["rejected"], one["completed"]) == (30, 10)
    two = simulate(SimConfig(gpu="H200", num_gpus=2, max_queue_len=10, router="round-robin"), burst,
                   step_cost=lambda s: 0.01)
    assert (two["rejected"], two["completed"]) == (20, 20)


def test_frontend_latency_adds_to_ttft_only():
    trace = poisson_trace(10.0, 10.0, 1)
    base = simulate(SimConfig(gpu="H200"), trace)
    late = simulate(SimConfig(gpu="H200", frontend_latency_s=0.05), trace)
    assert late["ttft_mean"] == pytest.approx(base["ttft_mean"] + 0.05)
    assert late["tpot_p50"] == pytest.approx(base["tpot_p50"])


def test_a_request_too_long_is_refused_not_fatal():
    trace = [SimRequest(0.0, 100, 10), SimRequest(0.1, 5000, 10), SimRequest(0.2, 100, 10)]
    report = simulate(SimConfig(gpu="H200", max_model_len=4096), trace, step_cost=lambda s: 0.01)
    assert (report["completed"], report["rejected"]) == (2, 1)


@pytest.mark.slow
def test_a_large_fleet_gives_the_same_report_fast_and_step_by_step():
    """The speed case scaled down: 100 replicas at 1,000 req/s (5 s of traffic) behind the front-end queue,
    decode runs against every step (~30 s: the reference path is ~15x slower)."""
    config = SimConfig(gpu="H100-SXM", num_gpus=100, frontend_request_s=8.7e-3, frontend_token_s=50e-6)
    trace = poisson_trace(1000.0, 5.0, 3)
    fast = simulate(config, trace, fast_forward=True)
    slow = simulate(config, trace, fast_forward=False)
    assert _without_timing(fast) == _without_timing(slow)
