"""The router fault suite's kill+restart load, measured with every request's and step's time, for the simulator's
replay (python -m meshserve.simulator.validation faults; PLANNER.md "Issue 28: the router fault tests' load").

Starts the cluster of tests/router/test_router_faults.py (three tiny-llama primaries, a tiny-qwen2 fallback, the
router with the suite's flags), each primary writing a step trace, and runs the suite's default scenario
(_kill_restart_under_load: 12 clients, every 4th request a 200-token stream, others 8 tokens; SIGKILL of
primary-1 at a quarter of 300 requests while a stream of its is fresh, restart at half, load until the restarted
replica served 10 again) ROUNDS times on the same cluster. Writes one JSON per round: the figures, the events'
times and every request (sent, seconds, outcome, replica, attempts, stream, phase) relative to the round's start,
and the primaries' steps of the round. Run from the repository root with the test environment (~1-2 min):

    python tools/fault_load_trace.py OUT_DIR [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshserve.distributed.launch import free_port
from tests.conftest import make_tiny_checkpoint
from tests.router.conftest import ServerProcess
from tests.router.loadgen import figures
from tests.router.test_router_faults import (
    ADMIT_S,
    NUM_PRIMARIES,
    ROUTER_FLAGS,
    _kill_restart_under_load,
    start_cluster,
    wait_until,
)

VICTIM, TOTAL, AFTER, CONCURRENCY = 1, 300, 10, 12  # test_replica_killed_and_restarted_under_steady_load's


def _steps(path: str, t0: float, t1: float) -> list[dict]:
    """The trace's steps stamped within [t0, t1], their times from t0."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{**r, "t": round(r["t"] - t0, 6)} for r in rows if t0 <= r["t"] <= t1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--rounds", type=int, default=3)
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
        for r in range(args.rounds):
            assert wait_until(c.all_healthy, ADMIT_S), "a replica is not healthy before the round"
            results, seconds, notes = asyncio.run(_kill_restart_under_load(c, VICTIM, TOTAL, AFTER, CONCURRENCY))
            t0 = notes.pop("t0")
            end = t0 + seconds
            record = {
                "scenario": {"victim": VICTIM, "total": TOTAL, "after": AFTER, "concurrency": CONCURRENCY,
                             "stream_every": 4, "max_tokens": 8, "stream_max_tokens": 200,
                             "router_flags": ROUTER_FLAGS},
                "figures": figures(results, seconds),
                "events": {k: (round(v - t0, 6) if k.endswith("_s") else v) for k, v in notes.items()},
                "requests": [{"index": x.index, "stream": x.stream, "sent_s": round(x.sent_s - t0, 6),
                              "seconds": round(x.seconds, 6), "outcome": x.outcome, "status": x.status,
                              "replica": x.replica, "attempts": x.attempts, "phase": x.phase}
                             for x in sorted(results, key=lambda x: x.index)],
                "steps": {f"primary-{i}": _steps(traces[i], t0, end) for i in range(NUM_PRIMARIES)},
            }
            path = os.path.join(args.out_dir, f"round{r}.json")
            with open(path, "w") as f:
                json.dump(record, f)
            print(f"round {r}: {record['figures']} events {record['events']} -> {path}", flush=True)
    finally:
        for p in started:
            p.kill()


if __name__ == "__main__":
    main()
