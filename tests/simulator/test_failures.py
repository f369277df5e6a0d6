"""Replica failures in a fleet run (failures.py through fleet.simulate, `--fail-replica`)."""

from __future__ import annotations

import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.simulator.autoscale import AutoscaleRule
from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.trace import SimRequest

STEP_S = 0.01


def _fixed(_shape) -> float:
    return STEP_S


def _config(failures, **kw) -> SimConfig:
    return SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=2, max_num_seqs=1, num_blocks=512,
                     replica_failures=failures, **kw)


# r0 -> replica 0 and r1 -> replica 1 (least outstanding), r2 -> replica 0 (the tie goes round), where it waits
# (one sequence at a time); each runs 100 steps of 10 ms
TRACE = [SimRequest(0.0, 8, 100), SimRequest(0.001, 8, 100), SimRequest(0.002, 8, 100)]


def test_a_kill_cuts_streams_with_tokens_and_sends_the_rest_elsewhere():
    report = simulate(_config(((0, 0.5, 1.0),)), TRACE, step_cost=_fixed)
    fail = report["replica_failures"]
    # r0 had tokens out: cut; r2 waited on replica 0 with none: sent to replica 1, after r1
    assert (fail["cut"], fail["retried"]) == (1, 1)
    assert report["completed"] == 2 and report["failed"] == 1
    # replica 1 ran r1 (100 steps) then r2: the run ends ~2 s after the start
    assert report["duration_s"] == pytest.approx(2.0, abs=0.05)
    [event] = fail["events"]
    # ready 1 s after the kill; re-admitted at the second good probe on the router's 2 s grid (2.0, 4.0)
    assert event["killed_s"] == 0.5 and event["ready_s"] == pytest.approx(1.5)
    assert event["readmitted_s"] == pytest.approx(4.0)


def test_the_restarted_replica_serves_again_once_readmitted():
    # r3 arrives while replica 0 is out (replica 1 alone: it waits behind r2), r4 after the re-admission (an empty
    # replica: it starts at once)
    trace = [*TRACE, SimRequest(3.0, 8, 10), SimRequest(4.5, 8, 10)]
    report = simulate(_config(((0, 0.5, 1.0),)), trace, step_cost=_fixed)
    assert report["completed"] == 4 and report["failed"] == 1
    assert report["duration_s"] == pytest.approx(4.5 + 10 * STEP_S, abs=0.01)
    # without the failure every request completes, and nothing is retried or cut
    plain = simulate(_config(()), trace, step_cost=_fixed)
    assert plain["completed"] == 5 and "replica_failures" not in plain


def test_a_request_on_its_way_to_a_dying_replica_is_retried():
    """With an API process (2 ms of intake) a request is still on its way to the core when the kill lands: it goes
    to the other replica, through its API process."""
    report = simulate(_config(((0, 0.001, 1.0),), frontend_request_s=0.002), [SimRequest(0.0, 8, 10)],
                      step_cost=_fixed)
    assert report["replica_failures"]["retried"] == 1 and report["completed"] == 1
    assert report["ttft_p50"] == pytest.approx(0.001 + 0.002 + STEP_S)


def test_a_second_failure_before_readmission_keeps_the_replica_out():
    """Ready at 1.5 s, killed again at 1.7 s (before the 4.0 s re-admission): back 0.5 s later, re-admitted at the
    second good probe after that (4.0, 6.0)."""
    report = simulate(_config(((0, 0.5, 1.0), (0, 1.7, 0.5))), TRACE, step_cost=_fixed)
    first, second = report["replica_failures"]["events"]
    assert first["ready_s"] == pytest.approx(1.5) and "readmitted_s" not in first
    assert second["ready_s"] == pytest.approx(2.2) and second["readmitted_s"] == pytest.approx(6.0)


def test_bad_failures_and_unmodelled_combinations_are_one_line_errors():
    for bad in (((2, 1.0, 1.0),), ((0, -1.0, 1.0),), ((0, 1.0, 0.0),), ((0, 1.0, 2.0), (0, 2.5, 1.0))):
        with pytest.raises(InvalidArgumentError, match="--fail-replica"):
            simulate(_config(bad), TRACE, step_cost=_fixed)
    with pytest.raises(InvalidArgumentError, match="not modelled with --autoscale"):
        simulate(_config(((0, 1.0, 1.0),)), TRACE, step_cost=_fixed,
                 autoscale=AutoscaleRule(min_replicas=1, max_replicas=2))


def _hang_config(hangs, **kw) -> SimConfig:
    return SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=2, num_blocks=512, replica_hangs=hangs,
                     **{"max_num_seqs": 1, **kw})


def test_a_short_hang_delays_its_requests_and_ejects_nothing():
    """Replica 0 stops at 0.5 s for 1 s: r0 (running) and r2 (waiting behind it) finish 1 s late; the probes at 2.0 s
    find it answering again, so nothing is ejected, cut or retried."""
    report = simulate(_hang_config(((0, 0.5, 1.0),)), TRACE, step_cost=_fixed)
    hang = report["replica_failures"]
    assert (hang["cut"], hang["retried"], report["completed"], report["failed"]) == (0, 0, 3, 0)
    [event] = hang["events"]
    assert event == {"replica": 0, "hung_s": 0.5, "resumed_s": 1.5}
    # replica 0 ran r0 (1 s of steps) then r2 (1 s), 1 s later than without the hang
    assert report["duration_s"] == pytest.approx(3.0, abs=0.05)
    plain = simulate(_hang_config(()), TRACE, step_cost=_fixed)
    assert plain["duration_s"] == pytest.approx(2.0, abs=0.05)


def test_a_long_hang_is_ejected_by_the_probes_and_readmitted_once_it_answers():
    """Replica 0 stops at 0.5 s for 10 s: the probe at 2.0 s gets no answer by 3.0 s, the router's next round starts
    2 s after that one ended and fails at 6.0 s: ejected (router/health.py waits out each probe's 1 s timeout
    before its 2 s sleep). The round at 8.0 fails at 9.0, the ones at 11.0 and 13.0 are answered: re-admitted at
    13.0 (one interval sooner than on a grid the failures do not shift). r3 (1.0 s) goes to replica 1 (replica 0
    holds two), r4 (6.0 s) too."""
    trace = [*TRACE, SimRequest(1.0, 8, 10), SimRequest(6.0, 8, 10)]
    report = simulate(_hang_config(((0, 0.5, 10.0),)), trace, step_cost=_fixed)
    [event] = report["replica_failures"]["events"]
    assert event["ejected_s"] == pytest.approx(6.0) and event["readmitted_s"] == pytest.approx(13.0)
    assert report["completed"] == 5 and report["failed"] == 0
    # replica 0 goes on at 10.5 s: r0's last 50 steps, then r2's 100: done at ~12.0 s
    assert report["duration_s"] == pytest.approx(12.0, abs=0.05)


def test_the_router_sends_a_hung_replica_work_until_the_probes_eject_it():
    """Both replicas hold one long request when replica 0 stops (0.05 s for 6 s): the next request ties at one
    outstanding each and goes to replica 0, where it waits for the hang's end; from then on least outstanding
    sends the short requests to replica 1 (they start at once), and after the ejection at 6.0 s (probes failing
    at 3.0 and 6.0) nothing else goes to replica 0."""
    trace = [SimRequest(0.0, 8, 1000), SimRequest(0.001, 8, 1000), *(SimRequest(0.1 + 0.5 * k, 8, 10) for k in range(12))]
    report = simulate(_hang_config(((0, 0.05, 6.0),), max_num_seqs=4), trace, step_cost=_fixed)
    assert report["completed"] == 14
    assert report["replica_failures"]["events"][0]["ejected_s"] == pytest.approx(6.0)
    # the one request held by the hung replica: its first token at 6.05 s + a step, sent at 0.1 s
    held = 6.05 + STEP_S - 0.1
    assert report["ttft_mean"] == pytest.approx((held + 13 * (STEP_S + 0.001)) / 14, abs=1e-3)
    assert report["ttft_p90"] < 2 * STEP_S


def test_a_hang_past_the_read_timeout_ends_its_requests_as_a_kill_does():
    """Replica 0 stops at 0.5 s for 200 s: ejected by the probes at 6.0 s; at 120.5 s the router's read timeout
    (120 s) cuts r0 (a token out) and sends r2 (waiting, nothing out) to replica 1; replica 0 goes on empty at 200.5
    s: the probe sent at 200.0 (failing rounds 3 s apart from 2.0) is answered then, the next at 202.5 re-admits
    it."""
    report = simulate(_hang_config(((0, 0.5, 200.0),)), TRACE, step_cost=_fixed)
    hang = report["replica_failures"]
    [event] = hang["events"]
    assert event["ejected_s"] == pytest.approx(6.0) and event["timed_out_s"] == pytest.approx(120.5)
    assert (event["cut"], event["retried"], hang["cut"], hang["retried"]) == (1, 1, 1, 1)
    assert event["readmitted_s"] == pytest.approx(202.5)
    assert report["completed"] == 2 and report["failed"] == 1
    # r2 runs on replica 1 from 120.5 s: 100 steps
    assert report["duration_s"] == pytest.approx(120.5 + 100 * STEP_S, abs=0.05)


def test_the_routers_health_settings_set_ejection_timeout_and_readmission():
    """As `meshserve router --health-interval 0.5 --health-timeout 0.2 --fail-threshold 3 --recover-threshold 1
    --read-timeout 10`: hung at 0.6 s, the rounds at 1.0, 1.7, 2.4 fail (each 0.2 s of timeout, then 0.5 s of
    sleep), ejected at 2.6 s; timed out at 10.6 s; the round at 20.6 s (1.0 + 28 x 0.7) is answered as it goes
    on: re-admitted then (one good probe)."""
    config = _hang_config(((0, 0.6, 20.0),), health_interval_s=0.5, health_timeout_s=0.2, fail_threshold=3,
                          recover_threshold=1, read_timeout_s=10.0)
    report = simulate(config, TRACE, step_cost=_fixed)
    [event] = report["replica_failures"]["events"]
    assert event["ejected_s"] == pytest.approx(2.6) and event["timed_out_s"] == pytest.approx(10.6)
    assert event["readmitted_s"] == pytest.approx(20.6)
    assert report["replica_failures"]["read_timeout_s"] == 10.0
    for bad, flag in ((dict(fail_threshold=0), "--fail-threshold"), (dict(health_interval_s=0.0), "--health-interval"),
                      (dict(read_timeout_s=-1.0), "--read-timeout")):
        with pytest.raises(InvalidArgumentError, match=flag):
            simulate(_hang_config(((0, 0.6, 1.0),), **bad), TRACE, step_cost=_fixed)


def test_bad_hangs_are_one_line_errors():
    for bad in (((2, 1.0, 1.0),), ((0, -1.0, 1.0),), ((0, 1.0, 0.0),)):
        with pytest.raises(InvalidArgumentError, match="--hang-replica"):
            simulate(_hang_config(bad), TRACE, step_cost=_fixed)
    with pytest.raises(InvalidArgumentError, match="--hang-replica 0@1.5.*still down"):
        simulate(_hang_config(((0, 1.5, 1.0),), replica_failures=((0, 1.0, 2.0),)), TRACE, step_cost=_fixed)
    with pytest.raises(InvalidArgumentError, match="--hang-replica is not modelled with --autoscale"):
        simulate(_hang_config(((0, 1.0, 1.0),)), TRACE, step_cost=_fixed,
                 autoscale=AutoscaleRule(min_replicas=1, max_replicas=2))
