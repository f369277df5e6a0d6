"""host_share.py: processor sharing of a host's cores, and the kill+restart replay on the fault suite's 2-core box."""

from __future__ import annotations

import pytest

from meshserve.simulator.faults import ClosedLoopLoad, KillRestart, run_kill_restart
from meshserve.simulator.host_share import SharedHost, fault_suite_host
from meshserve.simulator.validation_faults import (
    HOST,
    RESULTS,
    compare,
    load_round,
    measured_slowdown,
    phase_slowdowns,
)
from tests.simulator.test_faults import _config, _fixed  # the fault tests' small cluster and fixed step


def test_processor_sharing_arithmetic():
    host = SharedHost(cores=2, other_busy=3)
    # up to a process a core each runs at full speed; past it each gets cores / busy of a core
    assert [host.factor(n) for n in (0, 1, 2, 3, 4, 6)] == [1.0, 1.0, 1.0, 1.5, 2.0, 3.0]
    assert host.share(6) == pytest.approx(1 / 3) and host.share(1) == 1.0
    assert host.busy(3) == 6 and host.busy(2, starting=1) == 6
    # relative to the fit's (all three replicas busy): one dead is 5/6, its restart busy is back to 1, all up is 1
    assert host.slowdown(2, 0, 3) == pytest.approx(5 / 6)
    assert host.slowdown(2, 1, 3) == 1.0 and host.slowdown(3, 0, 3) == 1.0
    assert host.slowdown(3, 1, 3) == pytest.approx(7 / 6)
    # cores enough for everyone: no effect whatever the count
    roomy = SharedHost(cores=16, other_busy=3)
    assert {roomy.slowdown(r, s, 3) for r in range(4) for s in range(2)} == {1.0}
    # a baseline of its own (the cadence measured with two replicas busy)
    assert SharedHost(cores=2, other_busy=3, baseline_replicas=2).slowdown(3, 0, 3) == pytest.approx(6 / 5)
    with pytest.raises(ValueError):
        SharedHost(cores=0)
    # the suite's box: 2 cores, 2 router workers and the client besides the primaries
    assert fault_suite_host() == SharedHost(cores=2, other_busy=3) == HOST


def _kill_run(host, restart_after_sent: int = 10**9, limit_s: float = 3.0):
    # every 3rd request streams (the kill waits for a fresh stream on the victim), all of 8 tokens
    load = ClosedLoopLoad(concurrency=6, stream_every=3, output_len=8, stream_output_len=8)
    scenario = KillRestart(victim=1, kill_after_sent=30, restart_after_sent=restart_after_sent, start_s=1.0,
                           stop_after_sent=10**9)
    return run_kill_restart(_config(), _fixed, load, scenario, latency_s=0.0, limit_s=limit_s, host=host)


def _rate(run, phase: str, until: str | None = None) -> float:
    """Requests a second the client sent in the phase (until the event `until` when given)."""
    end = run.events[until] if until else float("inf")
    sent = [r.sent_s for r in run.requests if r.phase == phase and r.sent_s < end]
    return (len(sent) - 1) / (max(sent) - min(sent))


def test_dead_replica_share_speeds_its_peers():
    # one of three replicas killed for good on 2 cores with 3 other busy processes: its peers' steps take 5/6 as
    # long, so the closed loop's rate rises by 6/5 over the run without the host (the same before the kill)
    off, on = _kill_run(None), _kill_run(HOST)
    assert "kill_s" in off.events and "kill_s" in on.events and "restart_s" not in on.events
    assert _rate(on, "start") == pytest.approx(_rate(off, "start"), rel=0.02)
    assert _rate(on, "dead") > _rate(off, "dead") * 1.1
    assert _rate(on, "dead") / _rate(off, "dead") == pytest.approx(6 / 5, rel=0.03)
    # the dead phase's requests on the peers: each takes 5/6 of its time without the host
    def seconds(run) -> float:
        dead = [round(r.seconds, 6) for r in run.requests
                if r.phase == "dead" and r.attempts == 1 and r.outcome == "ok"]
        return max(set(dead), key=dead.count)

    assert {r.replica for r in on.requests if r.phase == "dead" and r.outcome == "ok"} == {0, 2}
    assert seconds(on) == pytest.approx(seconds(off) * 5 / 6)


def test_restarting_process_takes_the_share_back():
    # the restarted process busy from the restart to /ready: as many busy as with all three up, the steps back to
    # the fitted cadence, so the restart's start-up runs as without the host (and slower than the dead phase)
    off, on = _kill_run(None, 60, 4.0), _kill_run(HOST, 60, 4.0)
    assert on.events["restart_s"] < on.events["ready_s"] < on.events["readmitted_s"] < 4.0
    assert _rate(on, "restarting", "ready_s") == pytest.approx(_rate(off, "restarting", "ready_s"), rel=0.02)
    assert _rate(on, "dead") > _rate(on, "restarting", "ready_s") * 1.1


def test_off_is_the_old_replay():
    # no host, or a host with a core for every process, is the run without it, request for request
    load = ClosedLoopLoad(concurrency=5, stream_every=3, output_len=6, stream_output_len=20)
    scenario = KillRestart(victim=0, kill_after_sent=10, restart_after_sent=20, start_s=0.2, stop_after_sent=40,
                           stop_after_served=2)

    def cost(shape) -> float:
        return 0.002 + 0.001 * shape.num_seqs + 1e-5 * shape.num_tokens

    plain = run_kill_restart(_config(), cost, load, scenario, latency_s=0.01)
    for host in (None, SharedHost(cores=64, other_busy=3)):
        run = run_kill_restart(_config(), cost, load, scenario, latency_s=0.01, host=host)
        assert run.requests == plain.requests and run.events == plain.events
    # the replay without the host is the table of 2026-12-03 (PLANNER.md, issue 28's kill+restart)
    result = compare(load_round(RESULTS / "round0.json.gz"), host=None)
    assert {k: v[0] for k, v in result["figures"].items()} == {"sent": 431, "succeeded": 428, "retried": 1,
                                                               "failed_cleanly": 3, "seconds": 14.3}
    assert round(result["phases"]["dead"]["req_per_s"][0], 1) == 30.3


def test_measured_timeline_and_the_rounds_steps():
    events = {"kill_s": 2.0, "restart_s": 4.0, "ready_s": 12.0, "readmitted_s": 13.0}
    at = measured_slowdown(events, HOST)
    assert [at(t) for t in (1.0, 13.5)] == [1.0, 1.0]
    assert at(3.0) == at(12.5) == pytest.approx(5 / 6)  # dead; restarted but idle until re-admitted
    assert at(5.0) == 1.0  # the restart busy
    # the stored rounds' peers: their step time over the cadence, against the pre-kill phase, is what processor
    # sharing with six busy processes predicts: 5/6 dead, 1 while the restart is busy
    measured = phase_slowdowns([load_round(p) for p in sorted(RESULTS.glob("round*.json.gz"))])
    assert measured["dead"] == pytest.approx(5 / 6, abs=0.04)
    assert measured["restarting"] == pytest.approx(1.0, abs=0.04)
