"""router_admission.py: the router's --max-outstanding, alone and in the closed loop (faults.py)."""

from __future__ import annotations

import math

import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.simulator.config import SimConfig
from meshserve.simulator.faults import ClosedLoopLoad
from meshserve.simulator.faults_overload import Bursts, run_bursts
from meshserve.simulator.router_admission import RouterAdmission

STEP_S = 0.01


def test_at_the_limit_the_next_request_is_refused_until_one_ends():
    adm = RouterAdmission(max_outstanding=3)
    assert [adm.admit() for _ in range(3)] == [0, 0, 0]
    assert adm.admit() is None and adm.num_refused == 1 and adm.in_flight == [3]  # a refusal is not counted
    adm.release(0)
    assert adm.admit() == 0 and adm.in_flight == [3]
    assert adm.admit() is None and adm.num_refused == 2


def test_each_worker_has_its_own_count_and_limit():
    adm = RouterAdmission(max_outstanding=2, workers=2)
    assert [adm.admit() for _ in range(4)] == [0, 1, 0, 1]
    assert adm.admit() is None and adm.admit() is None  # both full: each refuses its next
    adm.release(1)
    assert adm.admit() is None  # round robin: worker 0's turn, and it is full
    assert adm.admit() == 1 and adm.in_flight == [2, 2]


def test_off_admits_everything():
    adm = RouterAdmission()
    assert not adm.enabled and all(adm.admit() == 0 for _ in range(10_000)) and adm.num_refused == 0


@pytest.mark.parametrize("kwargs", [{"max_outstanding": 0}, {"max_outstanding": 4, "workers": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(InvalidArgumentError):
        RouterAdmission(**kwargs)


def test_closed_loop_refusals_at_the_limit():
    """6 clients, 4 outstanding allowed, 10 requests in the burst, 8 tokens at 10 ms a step (80 ms each), a 503
    back in 50 ms: at t=0 four are admitted and two refused; those two come back at 0.05 and are refused again (4
    still in flight); at 0.08 the four end and two of their clients send the last two requests (admitted); the
    other clients find the burst's 10 sent. 6 served, 4 refused, none reaching a replica."""
    config = SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=3, max_num_seqs=8, max_queue_len=8,
                       max_model_len=256, num_blocks=1024, max_num_batched_tokens=2048)
    load = ClosedLoopLoad(concurrency=6, stream_every=0, output_len=8)
    adm = RouterAdmission(max_outstanding=4)
    run = run_bursts(config, lambda _shape: STEP_S, adm, load, Bursts(bursts=1, limit=10), refusal_s=0.05)
    reqs = run.requests
    refused = [r for r in reqs if r.outcome == "clean_error"]
    assert len(reqs) == 10 and len(refused) == 4 and adm.num_refused == 4
    assert all(r.status == 503 and r.replica is None and r.attempts == 1 for r in refused)
    assert sorted(r.sent_s for r in refused) == pytest.approx([0.0, 0.0, 0.05, 0.05])
    assert all(math.isclose(r.seconds, 0.05) for r in refused)
    served = [r for r in reqs if r.outcome == "ok"]
    assert sorted(r.sent_s for r in served) == pytest.approx([0.0] * 4 + [0.08] * 2)
    assert all(math.isclose(r.seconds, 8 * STEP_S) for r in served)
    assert adm.in_flight == [0]
    # without the limit nothing is refused
    free = run_bursts(config, lambda _shape: STEP_S, RouterAdmission(), load, Bursts(bursts=1, limit=10))
    assert all(r.outcome == "ok" for r in free.requests) and len(free.requests) == 10


def test_fleet_refuses_past_max_outstanding_and_admits_again_once_one_ends():
    """`meshserve simulate --max-outstanding 3`: 5 requests at once onto 2 replicas (100 steps of 10 ms each, 1 s):
    3 in flight, the 4th and 5th refused at once; one sent at 1.5 s, after all three ended, is served."""
    from meshserve.simulator.fleet import simulate
    from meshserve.simulator.trace import SimRequest

    config = SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=2, max_num_seqs=8, num_blocks=512,
                       replica_model="scheduler", max_outstanding=3)
    trace = [SimRequest(i * 1e-4, 8, 100) for i in range(5)] + [SimRequest(1.5, 8, 100)]
    report = simulate(config, trace, step_cost=lambda _shape: STEP_S)
    assert report["completed"] == 4 and report["rejected"] == 2
    assert report["router_admission"] == {"max_outstanding": 3, "refused": 2}
    # off (the default): all six served, and the report has no such section
    free = simulate(SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=2, max_num_seqs=8, num_blocks=512,
                              replica_model="scheduler"), trace, step_cost=lambda _shape: STEP_S)
    assert free["completed"] == 6 and free["rejected"] == 0 and "router_admission" not in free


def test_the_fast_model_leaves_max_outstanding_to_the_scheduler():
    from meshserve.simulator.fleet import simulate
    from meshserve.simulator.trace import SimRequest

    config = SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=1, max_num_seqs=8, num_blocks=512,
                       replica_model="fast", max_outstanding=1)
    report = simulate(config, [SimRequest(0.0, 8, 10), SimRequest(0.001, 8, 10)])
    assert report["replica_model"] == "scheduler" and "max-outstanding" in report["replica_model_fallback"]
    assert report["rejected"] == 1
    with pytest.raises(InvalidArgumentError):
        SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=1, max_outstanding=0).validate()
