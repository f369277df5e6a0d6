"""Replicas that die and come back during a fleet run (SimConfig.replica_failures, `--fail-replica R@T+D`).

As `meshserve router` meets a dead replica (meshserve/router/proxy.py, health.py): at the kill every connection to
it resets, so the router ejects it at once; a stream that already sent a token ends with its clean error event (a
failed request: not retried, nothing duplicated reaches the client), every other request on it (waiting in its API
process or its core, running, prompt or decode) goes to another replica as a new attempt; the restart answers /ready
D seconds after the kill (its process start and model load), and the router re-admits it after
`recover_threshold` consecutive good probes, one every `health_interval_s` on the router's own grid from t = 0.
The replica comes back empty (a new process: no KV, no prefix cache). Every request of the W3-style traces
streams, as `meshserve bench serve` sends them.

A hung replica (`--hang-replica R@T+D`, a SIGSTOP then a SIGCONT: alive, its port open, answering nothing) keeps
its requests: they wait, and so does every event of its own (a step's end, an arrival at its core) until it goes
on where it was at T + D. The router goes on sending it requests (least outstanding: fewer as its count grows)
until its health probes eject it: a probe that gets no answer within `health_timeout_s` fails, `fail_threshold`
failures in a row eject, and as health.py's loop waits for a round's every answer before its interval's sleep,
failing rounds come timeout + interval apart (FailureLog.hang_probes; the router fault suite's hung replica was
ejected 2.9-3.2 s after its SIGSTOP as seen by a client polling every 50 ms, against 2.5-3.0 s by this loop
and 1.5-2.0 s by a grid of probes the timeouts do not shift); it is re-admitted after `recover_threshold` good
probes once it answers. A
hang as long as the router's read timeout (`read_timeout_s`) times its requests out: at the hang's start plus that
timeout every request on it ends as at a kill (streams with a token out cut, the rest sent to other replicas), the
router ejects it (if its probes had not) and the server drops them all, so it goes on empty (as modelled, its
prefix cache goes too). A request the router sent it after the hang began times out up to the probes' ejection
later than that (seconds, against a two-minute timeout): taken at the same instant.

The fleet loop (fleet.py) owns the events; this module decides what a kill does to each request, when a probe
ejects a hung replica and when a replica serves again, and keeps the counts for the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from meshserve.router.config import RouterConfig


def committed(replica, seq_id: str, stream: bool = True, now: float | None = None) -> bool:
    """Whether the router has committed request seq_id on replica (a SimReplica): something reached the client.
    A stream commits with its first event (its first token out by now), a non-streamed answer only whole, so
    never while it runs (meshserve/router/proxy.py). A committed request ends with the stream's error event when
    its replica fails; any other is sent to another replica."""
    return stream and replica.has_first_token(seq_id, now)


@dataclass
class FailureLog:
    """What the replica failures did in a run (the report's replica_failures section)."""

    health_interval_s: float = RouterConfig.health_interval_s
    health_timeout_s: float = RouterConfig.health_timeout_s
    read_timeout_s: float = RouterConfig.read_timeout_s
    fail_threshold: int = RouterConfig.fail_threshold
    recover_threshold: int = RouterConfig.recover_threshold
    num_cut: int = 0  # streams ended with the error event (had sent a token)
    num_retried: int = 0  # requests sent again to another replica
    events: list[dict] = field(default_factory=list)
    _readmit_s: dict[int, float] = field(default_factory=dict)  # a hung replica's re-admission by its probes

    def readmit_s(self, ready_s: float) -> float:
        """When the router re-admits a replica that answers /ready from ready_s: its recover_threshold-th good
        probe."""
        first = math.ceil(ready_s / self.health_interval_s) * self.health_interval_s
        return first + (self.recover_threshold - 1) * self.health_interval_s

    def probe_ejection_s(self, hung_s: float, resumed_s: float = math.inf) -> float | None:
        """When the probes eject a replica hung from hung_s to resumed_s (None: it answers again first)."""
        return self.hang_probes(hung_s, resumed_s)[0]

    def hang_probes(self, hung_s: float, resumed_s: float = math.inf) -> tuple[float | None, float | None]:
        """(ejected_s, readmitted_s) of a replica hung from hung_s to resumed_s, as health.py's loop probes it: a
        round probes every replica, waits for every answer, then sleeps health_interval_s. Healthy rounds take no
        time, so the first after the hang starts on the interval's grid from t = 0; a probe sent during the hang
        gets no answer within health_timeout_s (a failure, the round ending at its timeout) unless the replica
        goes on before then (answered then). So failing rounds come timeout + interval apart: the
        fail_threshold-th failure ejects it, and once it answers, the recover_threshold-th good probe in a row
        re-admits it. (None, None): answered before the fail_threshold-th failure; readmitted None: never
        answers."""
        start = math.ceil(hung_s / self.health_interval_s) * self.health_interval_s
        fails = goods = 0
        ejected = None
        while True:
            if start + self.health_timeout_s < resumed_s:  # no answer in time
                end = start + self.health_timeout_s
                fails += 1
                if ejected is None and fails >= self.fail_threshold:
                    ejected = end
                    if math.isinf(resumed_s):
                        return ejected, None
            else:  # answered at once, or when it goes on
                end = max(start, resumed_s)
                if ejected is None:
                    return None, None
                goods += 1
                if goods >= self.recover_threshold:
                    return ejected, end
            start = end + self.health_interval_s

    def hang(self, replica: int, hung_s: float, resumed_s: float) -> float | None:
        """Record a hang of replica from hung_s to resumed_s; returns when the probes eject it (or None)."""
        ejected, readmitted = self.hang_probes(hung_s, resumed_s)
        self.events.append({"replica": replica, "hung_s": hung_s, "resumed_s": resumed_s,
                            **({} if ejected is None else {"ejected_s": ejected})})
        if readmitted is not None:
            self._readmit_s[replica] = readmitted
        return ejected

    def hang_readmit_s(self, replica: int, resumed_s: float) -> float:
        """When the router re-admits a replica ejected during its latest hang, which ended at resumed_s: the
        probes' (hang_probes), or, ejected by the read timeout alone, readmit_s's."""
        readmitted = self._readmit_s.pop(replica, None)
        return self.readmit_s(resumed_s) if readmitted is None else readmitted

    def split(self, replica, pending: list[int], now: float, hang: dict | None = None) -> list[int]:
        """At a kill of `replica` (a SimReplica) at now, or at the read timeout of its `hang` (that hang's record):
        the requests to send again (those on their way to its core in `pending`, and those in its core that have
        no token out yet); the streams with a token out are cut."""
        sched = replica.scheduler
        retry, cut = list(pending), 0
        for seq in (*sched.waiting, *sched.running):
            if committed(replica, seq.seq_id, now=now):
                cut += 1
            else:
                retry.append(int(seq.seq_id))
        self.num_cut += cut
        self.num_retried += len(retry)
        if hang is None:
            self.events.append({"replica": replica.index, "killed_s": now, "cut": cut, "retried": len(retry)})
        else:
            hang.update(timed_out_s=now, cut=cut, retried=len(retry))
        return sorted(retry)

    def latest(self, replica: int) -> dict:
        """The replica's latest failure's record (killed_s, cut, retried; ready_s, readmitted_s once they come; or
        a hang's hung_s, resumed_s, ejected_s, readmitted_s)."""
        return next(e for e in reversed(self.events) if e["replica"] == replica)

    def summary(self) -> dict:
        return {"health_interval_s": self.health_interval_s, "health_timeout_s": self.health_timeout_s,
                "read_timeout_s": self.read_timeout_s,
                "fail_threshold": self.fail_threshold, "recover_threshold": self.recover_threshold,
                "cut": self.num_cut, "retried": self.num_retried, "events": self.events}
