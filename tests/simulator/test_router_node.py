"""The router process as a CPU queue: an M/D/1 queue in closed form below saturation, a backlog that grows
without bound past it, refusals and retries through it, and its calibration file."""

from __future__ import annotations

import numpy as np
import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.router_node import RouterCosts, RouterNode, load_router_costs
from meshserve.simulator.trace import SimRequest, poisson_trace

_STEP = 0.01  # every simulated step lasts 10 ms in the fleet tests


def _step(shape) -> float:
    return _STEP


def test_below_saturation_a_job_takes_its_cost():
    """Jobs further apart than their cost never wait: the router adds exactly its cost (a relay of 10 events:
    a stream's event, on average, 5.5 events' cost)."""
    node = RouterNode(RouterCosts(per_request_s=0.002, per_event_s=1e-4, per_refusal_s=5e-4))
    assert node.intake(0.0) == pytest.approx(0.002)
    assert node.relay(0.01, 10) == pytest.approx(0.01 + 5.5e-4)
    assert node.refused(0.02) == pytest.approx(0.0205)
    assert node.busy_s == pytest.approx(0.002 + 0.001 + 0.0005)
    assert (node.num_requests, node.num_events, node.num_refusals) == (1, 10, 1)


@pytest.mark.parametrize("load", [0.5, 0.9])
def test_requests_queue_as_m_d_1(load):
    """Poisson requests at rate lam, each D of the router: the mean wait is lam D^2 / (2 (1 - lam D))."""
    service = 1.6e-3
    lam = load / service
    arrivals = np.cumsum(np.random.default_rng(1).exponential(1 / lam, 200_000))
    node = RouterNode(RouterCosts(per_request_s=service, per_event_s=0.0))
    waits = [node.intake(t) - service - t for t in arrivals.tolist()]
    assert np.mean(waits) == pytest.approx(lam * service**2 / (2 * (1 - load)), rel=0.06)


def test_past_saturation_the_backlog_grows_without_bound():
    """Offered 1.25 s of work per second: each second adds 0.25 s to the wait, however long it runs."""
    node = RouterNode(RouterCosts(per_request_s=0.0, per_event_s=1e-3))
    waits = [node.relay(i * 0.008, 10) - i * 0.008 for i in range(1250)]  # 10 ms of work every 8 ms
    # a token leaves on average 5.5 events into its job (its place among the 10 not known)
    assert waits[0] == pytest.approx(0.0055)
    assert waits[-1] == pytest.approx(0.0055 + 1249 * 0.002)
    assert node.max_backlog_s == pytest.approx(0.01 + 1249 * 0.002)


def test_a_late_submission_waits_behind_the_latest_and_keeps_its_work():
    """A replica's laid-out steps may hand in a job older than one already queued: it is queued as of the
    latest job, so no time runs backwards and no work is lost."""
    node = RouterNode(RouterCosts(per_request_s=0.0, per_event_s=1e-3))
    assert node.relay(1.0, 5) == pytest.approx(1.005 - 0.002)  # the job ends at 1.005, its middle event 2 ms before
    assert node.relay(0.5, 5) == pytest.approx(1.010 - 0.002)
    assert node.relay(2.0, 1) == pytest.approx(2.001)  # one event: when it is sent
    assert node.busy_s == pytest.approx(0.011)


def test_calibration_file():
    # the default: the router that ships, with httptools / uvloop, on the GPU host (2026-12-06); the same host's
    # fit two days earlier cost 1.5x an event, without httptools and uvloop (httpx, h11) 2.3x that
    host = load_router_costs()
    assert host == load_router_costs("h200_host_1206")
    assert host.per_request_s == pytest.approx(0.92e-3) and host.per_event_s == pytest.approx(40e-6)
    earlier = load_router_costs("h200_host")
    assert earlier.per_request_s == pytest.approx(1.13e-3) and earlier.per_event_s == pytest.approx(61e-6)
    assert load_router_costs("h200_host_httpx").per_event_s > 2 * earlier.per_event_s
    light = load_router_costs("cpu_light")
    assert light.per_request_s == pytest.approx(1.6e-3) and light.per_event_s == pytest.approx(102e-6)
    # the report's assumptions name the section and where it was measured (the alias resolved)
    from meshserve.simulator.router_node import router_costs_source

    said = router_costs_source()
    assert said.startswith("[h200_host_1206]: ") and "httptools" in said and "uvloop" in said
    assert router_costs_source("cpu_light").startswith("[cpu_light]: ") and "AMD EPYC" in router_costs_source("cpu_light")
    assert load_router_costs("cpu_loaded").per_event_s > light.per_event_s
    with pytest.raises(InvalidArgumentError, match="router_calibration.toml has"):
        load_router_costs("nope")


def _fleet(router: RouterCosts, **kw) -> SimConfig:
    return SimConfig(gpu="H200", num_gpus=2, frontend_request_s=1e-4, frontend_token_s=1e-6,
                     router_request_s=router.per_request_s, router_event_s=router.per_event_s,
                     router_refusal_s=router.per_refusal_s, **kw)


def test_an_idle_router_adds_its_intake_and_one_event_to_ttft():
    one = [SimRequest(0.0, 512, 16)]
    base = simulate(_fleet(RouterCosts(0.0, 0.0)), one, step_cost=_step)
    routed = simulate(_fleet(RouterCosts(per_request_s=0.002, per_event_s=3e-4)), one, step_cost=_step)
    assert routed["ttft_p50"] == pytest.approx(base["ttft_p50"] + 0.002 + 3e-4)
    assert routed["tpot_p50"] == pytest.approx(base["tpot_p50"])  # 0.3 ms per token, 10 ms apart: no queue
    assert routed["router_node"]["events"] == 16 and base["router_node"] is None


def test_below_the_routers_knee_latency_is_its_cost_past_it_goodput_falls():
    """Two replicas, 40 req/s of 32 tokens. Router at 2 ms + 20 us per event (13% busy): TTFT grows by about
    one intake and goodput holds. At 2 ms + 1 ms per event (1.36 s of work per second) its backlog grows for
    as long as the traffic lasts: TTFT of seconds, longer the longer the run, goodput collapses, and the run ends
    long after the last arrival."""
    def run(router: RouterCosts, duration: float) -> dict:
        return simulate(_fleet(router), poisson_trace(40.0, duration, 3, 256, 32), step_cost=_step)

    base = run(RouterCosts(0.0, 0.0), 20.0)
    light = run(RouterCosts(per_request_s=0.002, per_event_s=2e-5), 20.0)
    assert light["router_node"]["busy_fraction"] == pytest.approx(40 * (0.002 + 32 * 2e-5), rel=0.05)
    assert 0.002 <= light["ttft_p50"] - base["ttft_p50"] <= 0.004
    assert light["goodput"] == pytest.approx(base["goodput"], rel=0.01)
    heavy = run(RouterCosts(per_request_s=0.002, per_event_s=1e-3), 20.0)
    longer = run(RouterCosts(per_request_s=0.002, per_event_s=1e-3), 40.0)
    assert heavy["router_node"]["busy_fraction"] > 0.95
    assert heavy["ttft_p50"] > 2.0 and longer["ttft_p50"] > 1.7 * heavy["ttft_p50"]
    assert heavy["goodput"] < 0.2 * base["goodput"]
    # the backlog left at the last arrival (~0.36 s per second of traffic) drains after it
    assert heavy["duration_s"] > base["duration_s"] + 5.0


def test_a_refusal_goes_back_through_the_router_before_the_next_try():
    """Both replicas refuse (a queue of 0): the router takes each request in, sends it to one replica, reads
    its 429, tries the other, reads its 429 and answers the client: one intake and two refusals each."""
    reqs = [SimRequest(t, 128, 8) for t in (0.0, 1.0, 2.0)]
    costs = RouterCosts(per_request_s=0.002, per_event_s=1e-4, per_refusal_s=0.001)
    report = simulate(_fleet(costs, max_queue_len=0), reqs, step_cost=_step)
    assert report["failed"] == 3
    assert report["router_node"]["refusals"] == 6
    # each 429 reaches the client after the intake, two API intakes (0.1 ms) and two refusals
    assert report["reject_latency_p50"] == pytest.approx(0.002 + 2 * 1e-4 + 2 * 0.001)


def test_the_router_node_needs_the_front_end_queue():
    config = SimConfig(gpu="H200", router_request_s=0.002, router_event_s=1e-4)
    with pytest.raises(InvalidArgumentError, match="front-end queue"):
        config.validate()
    with pytest.raises(InvalidArgumentError, match=">= 0"):
        _fleet(RouterCosts(-1.0, 0.0)).validate()
