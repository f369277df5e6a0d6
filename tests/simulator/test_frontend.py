"""The API process's queue: an M/D/1 queue in closed form, and what it changes past the front end's knee."""

from __future__ import annotations

import numpy as np
import pytest

from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.frontend import FRONTEND_BEFORE_GATE, FRONTEND_H200, FrontEnd, FrontEndCosts
from meshserve.simulator.trace import SimRequest, poisson_trace


@pytest.mark.parametrize("load", [0.5, 0.8])
def test_intake_queue_is_m_d_1(load):
    """Poisson requests at rate lam, each taking D of the API process: the mean wait before the intake starts
    is Pollaczek-Khinchine's lam D^2 / (2 (1 - lam D))."""
    service = 2e-3
    lam = load / service
    arrivals = np.cumsum(np.random.default_rng(0).exponential(1 / lam, 200_000))
    fe = FrontEnd(FrontEndCosts(per_request_s=service, per_token_s=0.0))
    waits = [fe.intake(t) - service - t for t in arrivals.tolist()]
    assert np.mean(waits) == pytest.approx(lam * service**2 / (2 * (1 - load)), rel=0.05)
    assert fe.busy_s == pytest.approx(service * len(arrivals))


def test_tokens_queue_behind_requests_in_time_order():
    fe = FrontEnd(FrontEndCosts(per_request_s=0.01, per_token_s=0.001))
    assert fe.intake(0.0) == pytest.approx(0.01)
    assert fe.deliver(0.005, 10) == pytest.approx(0.02)  # waits for the intake, then 10 ms of tokens
    assert fe.deliver(1.0, 1) == pytest.approx(1.001)  # the queue drained meanwhile
    with pytest.raises(AssertionError):
        fe.deliver(0.5, 1)


def test_several_api_processes_share_the_work():
    """Two processes: a request goes to the idle one; a step's tokens split over both, seen when both are done."""
    fe = FrontEnd(FrontEndCosts(per_request_s=0.01, per_token_s=0.001), processes=2)
    assert fe.intake(0.0) == pytest.approx(0.01)
    assert fe.intake(0.0) == pytest.approx(0.01)  # the other process: no wait
    assert fe.intake(0.0) == pytest.approx(0.02)
    # at 0.01 process 0 has 10 ms of intake left, process 1 none: 2 tokens each, seen when process 0 is done
    assert fe.deliver(0.01, 4) == pytest.approx(0.01 + 0.01 + 0.002)
    assert fe.busy_s == pytest.approx(0.034)
    with pytest.raises(ValueError):
        FrontEnd(FRONTEND_H200, processes=0)


def test_a_request_reaches_the_core_after_its_intake():
    """One request on an idle server: TTFT grows by the intake and the first token's delivery, nothing else."""
    one = [SimRequest(0.0, 512, 16)]
    base = simulate(SimConfig(gpu="H200"), one, step_cost=lambda s: 0.01)
    fe = simulate(SimConfig(gpu="H200", frontend_request_s=0.005, frontend_token_s=0.001), one,
                  step_cost=lambda s: 0.01)
    assert fe["ttft_p50"] == pytest.approx(base["ttft_p50"] + 0.005 + 0.001)
    assert fe["tpot_p50"] == pytest.approx(base["tpot_p50"])  # 1 ms per token, 10 ms apart: no queue


def test_gate_tracks_the_worst_wait_of_the_last_second():
    """With the gate on, each process keeps the worst wait of a job that joined it in the last second (input
    delay: requests only; loop lag: every job), as serve/frontend_load.FrontendLoad does, and learns of it when
    the job starts (the timer fires, the handler runs), not when it joins; a gate 429 costs per_refusal_s, not a
    whole intake; without the gate nothing is tracked."""
    fe = FrontEnd(FrontEndCosts(per_request_s=0.01, per_token_s=0.001, per_refusal_s=0.002), gate=True)
    fe.intake(0.0)
    fe.deliver(0.0, 20)  # waits behind the intake: 10 ms
    assert fe.delay_s(0, 0.0) == (0.0, 0.0)  # not known yet: the job has not started
    assert fe.delay_s(0, 0.01) == pytest.approx((0.0, 0.01))
    assert fe.intake(0.012) == pytest.approx(0.04)  # 18 ms of work ahead of it
    assert fe.delay_s(0, 0.02) == pytest.approx((0.0, 0.01))
    assert fe.delay_s(0, 0.03) == pytest.approx((0.018, 0.018))
    assert fe.refuse(0.03, 0) == pytest.approx(0.042)  # its 429 after the queue, 2 ms of work
    assert fe.busy_s == pytest.approx(0.01 + 0.02 + 0.01 + 0.002) and fe.num_gate_refusals == 1
    assert fe.delay_s(0, 1.5) == pytest.approx((0.0, 0.0))  # forgotten after a window
    off = FrontEnd(FrontEndCosts(per_request_s=0.01, per_token_s=0.001))
    off.intake(0.0)
    off.intake(0.0)
    assert off.delay_s(0, 0.0) == (0.0, 0.0)
    assert FrontEndCosts(0.01, 0.0).refusal_s == 0.01  # no gate cost given: a whole intake


def test_the_gate_refuses_before_the_intake_when_the_api_process_lags():
    """One API process at 96 req/s of W3 with targets: the gate answers most 429s itself, cheaply, so the
    process stays short of saturation and goodput holds at the engine's (~52 req/s on an H200); the server
    before the gate (every 429 after a whole intake, the clock from the handler) collapsed there."""
    trace = poisson_trace(96.0, 15.0, 7)
    config = SimConfig(gpu="H200", max_model_len=4096, slo_ttft_s=1.0, slo_tpot_s=0.05,
                       frontend_request_s=FRONTEND_H200.per_request_s, frontend_token_s=FRONTEND_H200.per_token_s,
                       frontend_refusal_s=FRONTEND_H200.per_refusal_s)
    gated = simulate(config, trace)
    assert gated["frontend"]["gate"] is True
    assert gated["frontend"]["gate_refusals"] > 0.5 * gated["rejected"]
    assert gated["frontend"]["busy_fraction"] < 0.95
    assert gated["goodput"] > 45 and gated["ttft_p99"] < 1.0
    assert gated["reject_latency_p50"] < 0.2  # 429s come back promptly, as measured (p50 9-10 ms)
    # no targets: no gate, nothing refused
    bare = simulate(SimConfig(**{**vars(config), "slo_ttft_s": None, "slo_tpot_s": None}), poisson_trace(8.0, 2.0, 1))
    assert bare["frontend"]["gate_refusals"] == 0 and bare["rejected"] == 0


def test_past_the_front_ends_knee_slo_results_collapse_without_the_gate():
    """The server before the API process's gate (frontend_gate False), W3-like load at 96 req/s on one H200
    with targets: the engine alone keeps ~44 req/s of goodput by refusing the rest; with the API process
    saturated (its queue at ~100%) requests reach the core with their TTFT already spent and goodput
    collapses, as measured then (BENCHMARKS.md issue 18: 6.6 req/s), at that build's costs."""
    trace = poisson_trace(96.0, 15.0, 7)
    config = SimConfig(gpu="H200", max_model_len=4096, slo_ttft_s=1.0, slo_tpot_s=0.05, frontend_gate=False)
    engine_only = simulate(config, trace)
    with_fe = simulate(SimConfig(**{**vars(config), "frontend_request_s": FRONTEND_BEFORE_GATE.per_request_s,
                                    "frontend_token_s": FRONTEND_BEFORE_GATE.per_token_s}), trace)
    assert engine_only["goodput"] > 35 and engine_only["frontend"]["busy_fraction"] == 0
    assert with_fe["frontend"]["busy_fraction"] > 0.95
    assert with_fe["goodput"] < 0.5 * engine_only["goodput"]
    assert with_fe["ttft_p50"] > 1.0
    # `--api-server-count 2` halves each process's load: the knee moves past this rate and goodput comes back
    two = simulate(SimConfig(**{**vars(config), "frontend_request_s": FRONTEND_BEFORE_GATE.per_request_s,
                                "frontend_token_s": FRONTEND_BEFORE_GATE.per_token_s, "api_server_count": 2}), trace)
    assert two["frontend"]["busy_fraction"] < 0.75 and two["goodput"] > 0.8 * engine_only["goodput"]


def test_the_router_counts_a_request_from_when_it_sends_it():
    """Ten replicas under light load: the API process adds about one intake to TTFT, however many replicas.
    (Were a request counted only once its core had it, arrivals during an intake would all pile onto the
    same least-loaded replica.)"""
    trace = poisson_trace(100.0, 5.0, 2)
    base = simulate(SimConfig(gpu="H100-SXM", num_gpus=10), trace)
    fe = simulate(SimConfig(gpu="H100-SXM", num_gpus=10, frontend_request_s=8.7e-3, frontend_token_s=50e-6), trace)
    assert 8.7e-3 < fe["ttft_p50"] - base["ttft_p50"] < 12e-3
