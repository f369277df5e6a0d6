"""Replicas that die and come back during a fleet run (SimConfig.replica_failures, `--fail-replica R@T+D`).

As `meshserve router` meets a dead replica (meshserve/router/proxy.py, health.py): at the kill every connection to
it resets, so the router ejects it at once; a stream that already sent a token ends with its clean error event (a
failed request: not retried, nothing duplicated reaches the client), every other request on it (waiting in its API
process or its core, running, prompt or decode) goes to another replica as a new attempt; the restart answers /ready
D seconds after the kill (its process start and model load), and the router re-admits it after
`recover_threshold` consecutive good probes, one every `health_interval_s` on the router's own grid from t = 0.
The replica comes back empty (a new process: no KV, no prefix cache). Every request of the W3-style traces
streams, as `meshserve bench serve` sends them.

The fleet loop (fleet.py) owns the events; this module decides what a kill does to each request and when a restart
serves again, and keeps the counts for the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from meshserve.router.config import RouterConfig


@dataclass
class FailureLog:
    """What the replica failures did in a run (the report's replica_failures section)."""

    health_interval_s: float = RouterConfig.health_interval_s
    recover_threshold: int = RouterConfig.recover_threshold
    num_cut: int = 0  # streams ended with the error event (had sent a token)
    num_retried: int = 0  # requests sent again to another replica
    events: list[dict] = field(default_factory=list)

    def readmit_s(self, ready_s: float) -> float:
        """When the router re-admits a replica that answers /ready from ready_s: its recover_threshold-th good
        probe."""
        first = math.ceil(ready_s / self.health_interval_s) * self.health_interval_s
        return first + (self.recover_threshold - 1) * self.health_interval_s

    def split(self, replica, pending: list[int], now: float) -> list[int]:
        """At a kill of `replica` (a SimReplica) at now: the requests to send again (those on their way to its core
        in `pending`, and those in its core that have no token out yet); the streams with a token out are cut."""
        sched = replica.scheduler
        retry, cut = list(pending), 0
        for seq in (*sched.waiting, *sched.running):
            if replica.has_first_token(seq.seq_id, now):
                cut += 1
            else:
                retry.append(int(seq.seq_id))
        self.num_cut += cut
        self.num_retried += len(retry)
        self.events.append({"replica": replica.index, "killed_s": now, "cut": cut, "retried": len(retry)})
        return sorted(retry)

    def latest(self, replica: int) -> dict:
        """The replica's latest failure's record (killed_s, cut, retried; ready_s, readmitted_s once they come)."""
        return next(e for e in reversed(self.events) if e["replica"] == replica)

    def summary(self) -> dict:
        return {"health_interval_s": self.health_interval_s, "recover_threshold": self.recover_threshold,
                "cut": self.num_cut, "retried": self.num_retried, "events": self.events}
