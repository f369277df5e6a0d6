"""faults.py: the closed-loop client, the kill and the router's retries, re-admission, and the replay of the
router fault suite's measured rounds."""

from __future__ import annotations

import math

import pytest

from meshserve.simulator.config import SimConfig
from meshserve.simulator.faults import ClosedLoopLoad, KillRestart, RouterHealth, run_kill_restart
from meshserve.simulator.validation_faults import RESULTS, compare, load_round

STEP_S = 0.01


def _config(replicas: int = 3) -> SimConfig:
    return SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=replicas, max_num_seqs=8, max_queue_len=8,
                     max_model_len=256, num_blocks=1024, max_num_batched_tokens=2048)


def _fixed(_shape) -> float:
    return STEP_S


NEVER = KillRestart(kill_after_sent=10**9)


def test_closed_loop_without_faults_is_waves_of_fixed_length():
    # 6 clients over 3 replicas, 8 tokens each at 10 ms a step: every request takes its 8 steps plus the latency,
    # and a worker's next request starts when its last one ends
    load = ClosedLoopLoad(concurrency=6, stream_every=0, output_len=8)
    run = run_kill_restart(_config(), _fixed, load, NEVER, latency_s=0.005, limit_s=1.0)
    done = [r for r in run.requests if r.outcome == "ok"]
    assert done and all(math.isclose(r.seconds, 0.005 + 8 * STEP_S) for r in done)
    # waves of 6 every 85 ms up to the limit, nothing else
    assert len(run.requests) == 6 * (1 + math.floor(1.0 / 0.085))
    assert {r.replica for r in done} == {0, 1, 2} and "kill_s" not in run.events


def test_kill_cuts_committed_streams_and_retries_the_rest_elsewhere():
    load = ClosedLoopLoad(concurrency=6, stream_every=2, output_len=8, stream_output_len=40)
    scenario = KillRestart(victim=1, kill_after_sent=6, restart_after_sent=30, start_s=0.3, stop_after_sent=60,
                           stop_after_served=3)
    health = RouterHealth(health_interval_s=0.25, recover_threshold=2, max_attempts=3)
    run = run_kill_restart(_config(), _fixed, load, scenario, health)
    ev, reqs = run.events, run.requests
    # killed at the end of one of the victim's steps, once 6 were sent, when one of its streams has its first token
    assert ev["kill_sent"] >= 6 and math.isclose(ev["kill_s"] / STEP_S, round(ev["kill_s"] / STEP_S))
    cut = [r for r in reqs if r.outcome == "clean_error"]
    assert cut and all(r.stream and r.replica == 1 and r.end_s == ev["kill_s"] for r in cut)
    retried = [r for r in reqs if r.attempts > 1]
    assert retried and all(not r.stream and r.outcome == "ok" and r.replica != 1 for r in retried)
    # nothing reaches the victim between the kill and its re-admission, which waits for two good probes on the
    # router's 0.25 s grid after /ready
    assert ev["ready_s"] == pytest.approx(ev["restart_s"] + 0.3)
    assert ev["readmitted_s"] == pytest.approx(math.ceil(ev["ready_s"] / 0.25) * 0.25 + 0.25)
    between = [r for r in reqs if ev["kill_s"] < r.sent_s < ev["readmitted_s"] and r.outcome == "ok"]
    assert between and all(r.replica != 1 for r in between)
    # the load stops as the suite's does: enough sent, and the victim served again
    assert len(reqs) >= 60 and sum(r.replica == 1 and r.phase == "readmitted" for r in reqs) >= 3
    assert all(r.outcome in ("ok", "clean_error") for r in reqs)  # nothing left in flight
    assert {r.phase for r in reqs} == {"start", "dead", "restarting", "readmitted"}
    # three good probes: one interval later
    three = run_kill_restart(_config(), _fixed, load, scenario,
                             RouterHealth(health_interval_s=0.25, recover_threshold=3, max_attempts=3)).events
    assert three["readmitted_s"] == pytest.approx(math.ceil(three["ready_s"] / 0.25) * 0.25 + 0.5)


def test_deterministic():
    load = ClosedLoopLoad(concurrency=5, stream_every=3, output_len=6, stream_output_len=20)
    scenario = KillRestart(victim=0, kill_after_sent=10, restart_after_sent=20, start_s=0.2, stop_after_sent=40,
                           stop_after_served=2)

    def cost(shape) -> float:
        return 0.002 + 0.001 * shape.num_seqs + 1e-5 * shape.num_tokens

    a = run_kill_restart(_config(), cost, load, scenario, latency_s=0.01)
    b = run_kill_restart(_config(), cost, load, scenario, latency_s=0.01)
    assert a.requests == b.requests and a.events == b.events


def test_replay_of_the_measured_rounds_within_bounds():
    """The stored rounds of tools/fault_load_trace.py (PLANNER.md has the tables): the suite's figures and the
    rates and medians of the phases the fits do not see, within the bounds the replay met when it was written
    (the medians' 25% tightened to 20% and the rates held to 15% once the shared host was modelled, 2026-12-04)."""
    paths = sorted(RESULTS.glob("round*.json.gz"))
    assert len(paths) == 3
    for path in paths:
        result = compare(load_round(path))
        fig = result["figures"]
        for key in ("sent", "succeeded", "seconds"):
            sim, real = fig[key]
            assert abs(sim - real) / real < 0.15, (path.name, key, fig)
        for key in ("retried", "failed_cleanly"):
            sim, real = fig[key]
            assert abs(sim - real) <= 2, (path.name, key, fig)
        for phase in ("dead", "restarting"):
            for key, bound in (("plain_p50", 0.20), ("stream_p50", 0.20), ("req_per_s", 0.15)):
                sim, real = result["phases"][phase][key]
                assert abs(sim - real) / real < bound, (path.name, phase, key, sim, real)
