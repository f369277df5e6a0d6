"""The router fault suite's loads, measured with every request's and step's time for the simulator's replays.

(python -m meshserve.simulator.validation faults; PLANNER.md "Issue 28: the router fault tests' load".)

Starts the cluster of tests/router/test_router_faults.py (three tiny-llama primaries, a tiny-qwen2 fallback, the
router with the suite's flags), each primary writing a step trace, and runs the suite's default scenario
(_kill_restart_under_load: 12 clients, every 4th request a 200-token stream, others 8 tokens; SIGKILL of
primary-1 at a quarter of 300 requests while a stream of its is fresh, restart at half, load until the restarted
replica served 10 again) ROUNDS times on the same cluster. Writes one JSON per round: the figures, the events'
times and every request (sent, seconds, outcome, status, replica, attempts, stream, phase) relative to the round's
start, and the primaries' steps of the round. Run from the repository root with the test environment (~1-2 min):

    python tools/fault_load_trace.py OUT_DIR [--rounds 3] [--scenario kill-restart|hung|overload|kill-restart-x3 ...]

`--scenario hung` runs the suite's hung replica instead (_hung_under_load: 9 clients, 64-token streams, SIGSTOP of
primary-2 once 30 were sent, load until the router ejected it and 60 more were sent; then SIGCONT and its
re-admission), files hung_round*.json; `--scenario overload` the overload test's three bursts (_overload_burst: 120
clients, 240 requests of 8 tokens each, every 5th streamed), files overload_round*.json, each request with its burst;
`--scenario kill-restart-x3` the slow test's three kill+restart cycles (each primary in turn: 16 clients, kill at 125
of 500 sent, restart at 250, load until the restarted replica served 30 again), files x3_round*.json, each request
and event with its cycle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshserve.distributed.launch import free_port
from meshserve.router.workers import default_workers
from tests.conftest import make_tiny_checkpoint
from tests.router.conftest import ServerProcess
from tests.router.loadgen import figures
from tests.router.test_router_faults import (
    ADMIT_S,
    NUM_PRIMARIES,
    OVERLOAD_BURST,
    OVERLOAD_TOKENS,
    ROUTER_FLAGS,
    _check_kill_restart,
    _hung_under_load,
    _kill_restart_under_load,
    _overload_burst,
    start_cluster,
    wait_until,
)

VICTIM, TOTAL, AFTER, CONCURRENCY = 1, 300, 10, 12  # test_replica_killed_and_restarted_under_steady_load's
HUNG_VICTIM = 2  # test_hung_replica_is_ejected_by_timeout_and_readmitted's
X3_TOTAL, X3_AFTER, X3_CONCURRENCY = 500, 30, 16  # test_replica_kill_restart_cycles_long's


def _steps(path: str, t0: float, t1: float) -> list[dict]:
    """The trace's steps stamped within [t0, t1], their times from t0."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{**r, "t": round(r["t"] - t0, 6)} for r in rows if t0 <= r["t"] <= t1]


def _requests(results, t0: float, burst: int | None = None, cycle: int | None = None) -> list[dict]:
    extra = {k: v for k, v in (("burst", burst), ("cycle", cycle)) if v is not None}
    return [{"index": x.index, "stream": x.stream, "sent_s": round(x.sent_s - t0, 6), "seconds": round(x.seconds, 6),
             "outcome": x.outcome, "status": x.status, "replica": x.replica, "attempts": x.attempts,
             "phase": x.phase, **extra} for x in sorted(results, key=lambda x: x.index)]


def _kill_restart_round(c) -> tuple[dict, float, float]:
    results, seconds, notes = asyncio.run(_kill_restart_under_load(c, VICTIM, TOTAL, AFTER, CONCURRENCY))
    t0 = notes.pop("t0")
    return {"scenario": {"victim": VICTIM, "total": TOTAL, "after": AFTER, "concurrency": CONCURRENCY,
                         "stream_every": 4, "max_tokens": 8, "stream_max_tokens": 200, "router_flags": ROUTER_FLAGS},
            "figures": figures(results, seconds),
            "events": {k: (round(v - t0, 6) if k.endswith("_s") else v) for k, v in notes.items()},
            "requests": _requests(results, t0)}, t0, t0 + seconds


def _hung_round(c) -> tuple[dict, float, float]:
    """test_hung_replica_is_ejected_by_timeout_and_readmitted's scenario; SIGCONT after it, and the victim serving
    again before the next round."""
    try:
        results, seconds, notes = asyncio.run(_hung_under_load(c, HUNG_VICTIM))
    finally:
        c.primaries[HUNG_VICTIM].signal(signal.SIGCONT)
    t0 = notes.pop("t0")
    record = {"scenario": {"victim": HUNG_VICTIM, "hang_after_sent": 30, "after_ejection": 60, "concurrency": 9,
                           "stream_every": 4, "max_tokens": 8, "stream_max_tokens": 64,
                           "router_flags": ROUTER_FLAGS},
              "figures": figures(results, seconds),
              "events": {k: (round(v - t0, 6) if k.endswith("_s") else v) for k, v in notes.items()},
              "requests": _requests(results, t0)}
    assert wait_until(lambda: c.healthy(f"primary-{HUNG_VICTIM}"), ADMIT_S), "the hung replica was not re-admitted"
    return record, t0, t0 + seconds


def _overload_round(c) -> tuple[dict, float, float]:
    """test_overload_gets_fast_refusals_with_retry_after_and_no_memory_growth's three bursts, back to back."""
    t0 = time.monotonic()
    requests, bursts = [], []
    for b in range(3):
        start = time.monotonic()
        results, seconds = asyncio.run(_overload_burst(c))
        bursts.append({"start_s": round(start - t0, 6), "seconds": round(seconds, 6),
                       "figures": figures(results, seconds)})
        requests += _requests(results, t0, b)
    seconds = time.monotonic() - t0
    record = {"scenario": {"bursts": 3, "limit": OVERLOAD_BURST, "concurrency": 120, "stream_every": 5,
                           "max_tokens": OVERLOAD_TOKENS, "stream_max_tokens": OVERLOAD_TOKENS,
                           "router_flags": ROUTER_FLAGS, "router_workers": default_workers()},
              "figures": {**{k: sum(b["figures"][k] for b in bursts) for k in
                             ("sent", "succeeded", "retried", "fallback", "failed_cleanly", "lost")},
                          "seconds": round(sum(b["seconds"] for b in bursts), 1)},
              "bursts": bursts, "requests": requests}
    assert wait_until(c.all_healthy, ADMIT_S), "overload left a replica ejected"
    return record, t0, t0 + seconds


def _x3_round(c) -> tuple[dict, float, float]:
    """test_replica_kill_restart_cycles_long's three cycles (victim 0, 1, 2), back to back with the test's checks
    between them; its figures are the cycles' together, its seconds their sum. A failed check is recorded, not
    raised (the round's requests are still the measurement)."""
    t0 = time.monotonic()
    requests, cycles = [], []
    for victim in range(NUM_PRIMARIES):
        results, seconds, notes = asyncio.run(_kill_restart_under_load(c, victim, X3_TOTAL, X3_AFTER,
                                                                       X3_CONCURRENCY))
        start = notes.pop("t0")
        fig = figures(results, seconds)
        try:
            _check_kill_restart(c, results, fig, notes, victim)
            check = "passed"
        except AssertionError as e:
            check = f"failed: {e}"
        cycles.append({"victim": victim, "start_s": round(start - t0, 6), "seconds": round(seconds, 6),
                       "figures": fig, "check": check,
                       "events": {k: (round(v - t0, 6) if k.endswith("_s") else v) for k, v in notes.items()}})
        requests += _requests(results, t0, cycle=victim)
    record = {"scenario": {"victims": list(range(NUM_PRIMARIES)), "total": X3_TOTAL, "after": X3_AFTER,
                           "concurrency": X3_CONCURRENCY, "stream_every": 4, "max_tokens": 8,
                           "stream_max_tokens": 200, "router_flags": ROUTER_FLAGS},
              "figures": {**{k: sum(cy["figures"][k] for cy in cycles) for k in
                             ("sent", "succeeded", "retried", "fallback", "failed_cleanly", "lost")},
                          "seconds": round(sum(cy["seconds"] for cy in cycles), 1)},
              "cycles": cycles, "requests": requests}
    return record, t0, time.monotonic()


SCENARIOS = {"kill-restart": ("round", _kill_restart_round), "hung": ("hung_round", _hung_round),
             "overload": ("overload_round", _overload_round), "kill-restart-x3": ("x3_round", _x3_round)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), action="append",
                    help="repeatable; default kill-restart (the files round*.json)")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="fault-load-")
    llama = make_tiny_checkpoint(os.path.join(work, "llama"), "llama")
    qwen = make_tiny_checkpoint(os.path.join(work, "qwen2"), "qwen2")
    traces = [os.path.join(work, f"steps-{i}.jsonl") for i in range(NUM_PRIMARIES)]
    started: list[ServerProcess] = []

    def make(name: str, process_args: list[str]) -> ServerProcess:
        started.append(ServerProcess(name, process_args, free_port(), work))
        return started[-1]

    try:
        c = start_cluster(make, llama, qwen, lambda i: ["--step-trace", traces[i]])
        for scenario in args.scenario or ["kill-restart"]:
            stem, run_round = SCENARIOS[scenario]
            for r in range(args.rounds):
                assert wait_until(c.all_healthy, ADMIT_S), "a replica is not healthy before the round"
                record, t0, end = run_round(c)
                record["steps"] = {f"primary-{i}": _steps(traces[i], t0, end) for i in range(NUM_PRIMARIES)}
                path = os.path.join(args.out_dir, f"{stem}{r}.json")
                with open(path, "w") as f:
                    json.dump(record, f)
                print(f"{scenario} round {r}: {record['figures']} events {record.get('events')} -> {path}",
                      flush=True)
    finally:
        for p in started:
            p.kill()


if __name__ == "__main__":
    main()
