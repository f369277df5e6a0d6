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
