"""faults_hang.py and faults_overload.py: a replica hung under the closed loop, the overload bursts, and the replay
of the router fault suite's measured rounds of both (validation_hang_overload.py)."""

from __future__ import annotations

import pytest

from meshserve.simulator.config import SimConfig
from meshserve.simulator.faults import ClosedLoopLoad, RouterHealth, probe_ejection_s
from meshserve.simulator.faults_hang import HungReplica, run_hung
from meshserve.simulator.validation_hang_overload import (
    _rounds,
    compare_hung,
    compare_overload,
    hung_latency_s,
    load_round,
)

STEP_S = 0.01
HEALTH = RouterHealth(health_interval_s=0.5, health_timeout_s=1.0, fail_threshold=2, read_timeout_s=4.0)


def _config() -> SimConfig:
    return SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=3, max_num_seqs=8, max_queue_len=8,
                     max_model_len=256, num_blocks=1024, max_num_batched_tokens=2048)


def test_probes_eject_after_the_failing_rounds_and_their_timeouts():
    # hung at 0.6: the round at 1.0 times out at 2.0, the next starts 0.5 later and times out at 3.5
    assert probe_ejection_s(0.6, HEALTH) == pytest.approx(3.5)
    assert probe_ejection_s(1.0, HEALTH) == pytest.approx(3.5)  # a round that starts as it stops fails too
    three = RouterHealth(health_interval_s=0.5, health_timeout_s=1.0, fail_threshold=3)
    assert probe_ejection_s(0.6, three) == pytest.approx(5.0)


def test_a_hung_replica_times_out_its_requests_and_is_ejected():
    """3 clients, every other request a 40-token stream (0.4 s), 8 tokens otherwise (0.08 s); the victim stops
    once 8 were sent. Its committed streams end with the error event at their last token + the read timeout, its
    other requests are sent elsewhere at their attempt + the read timeout; the probes eject it 2.5-3 s in, and
    after that it gets nothing; the load stops 10 requests after the ejection."""
    load = ClosedLoopLoad(concurrency=3, stream_every=2, output_len=8, stream_output_len=40)
    scenario = HungReplica(victim=1, hang_after_sent=8, after_ejection=10)
    run = run_hung(_config(), lambda _shape: STEP_S, load, scenario, HEALTH)
    ev, reqs = run.events, run.requests
    hang = ev["hang_s"]
    assert ev["hang_sent"] == 8 and ev["ejected_s"] == pytest.approx(probe_ejection_s(hang, HEALTH))
    caught = [r for r in reqs if r.sent_s <= hang and (r.outcome == "clean_error" or r.attempts > 1)]
    assert caught
    for r in caught:
        if r.outcome == "clean_error":  # a stream with tokens out, cut: its last token came before the hang
            assert r.stream and r.replica == 1 and hang + 4.0 - 0.4 < r.end_s <= hang + 4.0 + 1e-9
        else:  # retried at its attempt's timeout, then served in full elsewhere
            assert r.attempts == 2 and r.replica != 1 and r.outcome == "ok"
            assert r.end_s == pytest.approx(r.sent_s + 4.0 + (40 if r.stream else 8) * STEP_S)
    # after the hang every request but the caught ones was served elsewhere, in its plain time
    later = [r for r in reqs if r.sent_s > hang]
    assert all(r.outcome == "ok" and r.replica != 1 and r.attempts == 1 for r in later)
    assert len(reqs) == ev["ejected_sent"] + 10
    assert {r.phase for r in reqs} == {"start", "hung", "ejected"}
    # deterministic
    again = run_hung(_config(), lambda _shape: STEP_S, load, scenario, HEALTH)
    assert again.requests == reqs and again.events == ev


def test_replay_of_the_hung_rounds_within_bounds():
    """tools/fault_load_trace.py --scenario hung (PLANNER.md has the tables): the suite's figures, the ejection and
    the rates and medians the fit does not see, within the bounds the replay met when it was written."""
    paths = _rounds("hung_round")
    assert len(paths) == 3
    for path in paths:
        r = compare_hung(load_round(path))
        fig, ev = r["figures"], r["events"]
        for key, bound in (("sent", 0.10), ("succeeded", 0.10), ("seconds", 0.15)):
            sim, real = fig[key]
            assert abs(sim - real) / real < bound, (path.name, key, fig)
        for key in ("retried", "failed_cleanly"):
            sim, real = fig[key]
            assert abs(sim - real) <= 2, (path.name, key, fig)
        assert ev["caught"][0] == ev["caught"][1], (path.name, ev)
        sim, real = ev["ejected_s"]  # measured: when the client's poll (every 50 ms) saw it
        assert -1.0 < sim - real <= 0.1, (path.name, ev)
        for phase in ("hung", "ejected"):
            sim, real = r["phases"][phase]["req_per_s"]
            assert abs(sim - real) / real < 0.25, (path.name, phase, sim, real)
        sim, real = r["phases"]["ejected"]["plain_p50"]
        assert abs(sim - real) / real < 0.25, (path.name, sim, real)


def test_replay_of_the_overload_rounds_within_bounds():
    """tools/fault_load_trace.py --scenario overload: the served and refused counts within the bounds the replay met
    when it was written; the bursts' time shorter than measured (the client's and the router's CPU, PLANNER.md)."""
    paths = _rounds("overload_round")
    hung = _rounds("hung_round")
    assert len(paths) == 3 and len(hung) == 3
    for path, h in zip(paths, hung, strict=True):
        fig = compare_overload(load_round(path), hung_latency_s(load_round(h)))["figures"]
        sim, real = fig["succeeded"]
        assert abs(sim - real) / real < 0.10, (path.name, fig)
        sim, real = fig["failed_cleanly"]
        assert abs(sim - real) / real < 0.25, (path.name, fig)
        assert fig["503"][0] > 0 and fig["429"][0] > 0  # both refusals: the router's limit and the replicas' queues
        sim, real = fig["seconds"]
        assert 0.5 * real < sim < real, (path.name, fig)
