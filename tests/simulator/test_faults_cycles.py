"""faults_cycles.py: the slow kill+restart x3 (each replica killed and restarted in turn, a load per cycle), and the
replay of the router fault suite's measured rounds of it (validation_cycles.py)."""

from __future__ import annotations

import math

import pytest

from meshserve.simulator.config import SimConfig
from meshserve.simulator.faults import ClosedLoopLoad, KillRestart, RouterHealth
from meshserve.simulator.faults_cycles import CyclesRun, KillRestartCyclesRun
from meshserve.simulator.validation_cycles import RESULTS, compare, load_round

STEP_S = 0.01
LOAD = ClosedLoopLoad(concurrency=6, stream_every=2, output_len=8, stream_output_len=40)
HEALTH = RouterHealth(health_interval_s=0.25, recover_threshold=2, max_attempts=3)
CYCLES = tuple(KillRestart(victim=v, kill_after_sent=6, restart_after_sent=30, start_s=0.3 + 0.1 * v,
                           stop_after_sent=60, stop_after_served=3) for v in range(3))


def _config() -> SimConfig:
    return SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=3, max_num_seqs=8, max_queue_len=8,
                     max_model_len=256, num_blocks=1024, max_num_batched_tokens=2048)


def _run() -> tuple[KillRestartCyclesRun, CyclesRun]:
    sim = KillRestartCyclesRun(_config(), lambda _shape: STEP_S, LOAD, HEALTH, 0.005, cycles=CYCLES)
    return sim, sim.run()


def test_three_cycles_kill_and_restart_each_replica_in_turn():
    sim, run = _run()
    assert [cy["victim"] for cy in run.cycles] == [0, 1, 2]
    assert sim.incarnation == [2, 2, 2]  # each replica died once and came back once
    for c, cy in enumerate(run.cycles):
        ev, v = cy["events"], cy["victim"]
        last = run.cycles[c + 1]["first"] if c < 2 else len(run.requests)
        reqs = run.requests[cy["first"]:last]
        # a load of its own: it starts when the last cycle's last request ended, counts from 0, streams every 2nd
        assert cy["start_s"] == (run.cycles[c - 1]["end_s"] if c else 0.0)
        assert all(r.stream == ((r.index - cy["first"]) % 2 == 1) for r in reqs)
        assert all(cy["start_s"] <= r.sent_s and r.end_s <= cy["end_s"] for r in reqs)
        assert max(r.end_s for r in reqs) == cy["end_s"]
        # killed once 6 of the cycle's were sent, restarted at 30, /ready its own start-up later, re-admitted on
        # the router's probe grid (the run's, from the first cycle's start)
        assert ev["kill_sent"] >= 6 and ev["kill_s"] < ev["restart_s"] < ev["ready_s"] < ev["readmitted_s"]
        assert ev["ready_s"] == pytest.approx(ev["restart_s"] + 0.3 + 0.1 * v)
        assert ev["readmitted_s"] == pytest.approx(math.ceil(ev["ready_s"] / 0.25) * 0.25 + 0.25)
        # only the victim's committed streams are cut, at the kill; its other requests go elsewhere
        cut = [r for r in reqs if r.outcome == "clean_error"]
        assert cut and all(r.stream and r.replica == v and r.end_s == ev["kill_s"] for r in cut)
        assert all(r.replica != v for r in reqs if r.attempts > 1)
        # nothing reaches the victim while it is out; it serves the 3 again before the cycle stops
        out = [r for r in reqs if ev["kill_s"] < r.sent_s < ev["readmitted_s"] and r.outcome == "ok"]
        assert out and all(r.replica != v for r in out)
        assert len(reqs) >= 60 and sum(r.replica == v and r.phase == "readmitted" for r in reqs) >= 3
        assert {r.phase for r in reqs} == {"start", "dead", "restarting", "readmitted"}
    # the suite's figures: the cycles together, the seconds their sum
    fig = run.figures()
    assert fig["sent"] == len(run.requests) == sum(run.cycle_figures(c)["sent"] for c in range(3))
    assert fig["seconds"] == pytest.approx(sum(cy["end_s"] - cy["start_s"] for cy in run.cycles), abs=0.05)
    assert all(r.outcome in ("ok", "clean_error") for r in run.requests)


def test_deterministic():
    _, a = _run()
    _, b = _run()
    assert a.requests == b.requests and a.cycles == b.cycles


def test_replay_of_the_measured_rounds_within_bounds():
    """tools/fault_load_trace.py --scenario kill-restart-x3 (PLANNER.md has the table): the suite's figures of each
    round and cycle, the re-admission and the phases the fits do not see, within the bounds the replay met when it
    was written."""
    paths = sorted(RESULTS.glob("x3_round*.json.gz"))
    assert len(paths) == 3
    for path in paths:
        result = compare(load_round(path))
        for fig in [result["figures"], *(cy["figures"] for cy in result["cycles"])]:
            for key in ("sent", "succeeded", "seconds"):
                sim, real = fig[key]
                assert abs(sim - real) / real < 0.15, (path.name, key, fig)
        for cy in result["cycles"]:
            where = (path.name, cy["victim"])
            fig, phases = cy["figures"], cy["phases"]
            assert abs(fig["retried"][0] - fig["retried"][1]) <= 2, (where, fig)
            # measured 5 cut in two cycles where 2 were simulated: its streams are shorter before the kill (below)
            assert 1 <= fig["failed_cleanly"][0] and abs(fig["failed_cleanly"][0] - fig["failed_cleanly"][1]) <= 3
            sim, real = cy["events"]["readmitted_s"]  # from the cycle's start
            assert abs(sim - real) < 3.0, (where, cy["events"])
            sim, real = phases["restarting"]["req_per_s"]
            assert abs(sim - real) / real < 0.20, (where, sim, real)
            for key in ("plain_p50", "stream_p50"):
                sim, real = phases["restarting"][key]
                assert abs(sim - real) / real < 0.30, (where, key, sim, real)
            # with the victim dead its peers get its CPU share (not modelled): measured faster, by 16-70% here
            sim, real = phases["dead"]["plain_p50"]
            assert real <= sim < 1.8 * real, (where, sim, real)
