"""The router process in front of the replicas (`meshserve router`, `serve --data-parallel-backend router`):
one CPU queue that every request, every refusal it retries and every streamed event of every replica crosses.

The router is one Python process (one event loop): it parses each request, picks a replica, sends it on with
httpx, and relays each streamed event of the answer. Modelled as one first-come-first-served server, like an
API process (frontend.py): a request's intake costs per_request_s and the replica gets the request when it is
done (the policy chooses then, on the counts of then); a 429 from a replica costs per_refusal_s, after which
the request goes to the next replica or its 429 to the client; the tokens of one step of a replica reach the
router when that replica's API process has streamed them, cost per_event_s each (one event per stream per
step), and leave one after another (a stream's token, in no known place among them, at the job's middle on
average; until 2026-12-06 all at its end, which charged every token the whole step's relay). Below saturation
the router adds about one intake to TTFT and one event per token; past it (W3: ~130 events per request, so
~13-17 ms of the router per request) its backlog grows without bound, and requests, refusals and tokens all wait
behind it: TTFT of seconds and 429s that take as long, while the replicas sit partly idle. That is the collapse measured at DP=2 through the router, QPS
128 (BENCHMARKS.md, seventh session).

The relay: the router since 24b22a5 sends the whole events of one upstream read at once, so a lagging
router would pay one send for several events of a stream. On the CPU it made no difference (1.02 sends per
event with the router starved to a third of a core: a stream's events come a step apart and the router
reads each on its own), so both relays have one per_event_s.

Jobs come from several replicas, so they need not arrive in time order (a replica's tokens reach the router
when its own API process is done with them; fleet.py runs replicas step by step with a router node, as decode
runs laid out ahead would hand theirs in late): a job that arrives before the latest one seen is queued as if
it came then (it waits at most that much too long; the work is kept). The calibration is a CPU measurement (router_calibration.toml).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from meshserve.errors import InvalidArgumentError

ROUTER_CALIBRATION_FILE = Path(__file__).with_name("router_calibration.toml")


@dataclass(frozen=True)
class RouterCosts:
    """CPU seconds of the router process per request (parse, choose, send on, set up its stream), per 429
    from a replica (read it, then retry or pass it on) and per streamed event relayed."""

    per_request_s: float
    per_event_s: float
    per_refusal_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.per_request_s > 0 or self.per_event_s > 0


ROUTER_OFF = RouterCosts(0.0, 0.0)


def _router_section(name: str) -> tuple[str, dict]:
    """(the section's own name, its entry) for a section of router_calibration.toml or an alias ("default")."""
    sections = tomllib.loads(ROUTER_CALIBRATION_FILE.read_text())
    entry = sections.get(name)
    if isinstance(entry, str):
        name, entry = entry, sections.get(entry)
    if not isinstance(entry, dict):
        raise InvalidArgumentError(f"no router calibration {name!r}; router_calibration.toml has "
                                   f"{', '.join(sections)}", param="router_calibration")
    return name, entry


def router_calibration_name(name: str = "default") -> str:
    """The section an alias such as "default" names (a section's own name for itself)."""
    return _router_section(name)[0]


def load_router_costs(name: str = "default") -> RouterCosts:
    """A section of router_calibration.toml (or the section an alias such as "default" names)."""
    entry = _router_section(name)[1]
    return RouterCosts(entry["per_request_ms"] / 1e3, entry["per_event_us"] / 1e6, entry["per_refusal_ms"] / 1e3)


def router_costs_source(name: str = "default") -> str:
    """Where a calibration's costs were measured, for the report's assumptions: "[section]: its source"."""
    section, entry = _router_section(name)
    return f"[{section}]: {entry.get('source', 'no source recorded')}"


class RouterNode:
    """The router's process as one FCFS queue (the Lindley recursion): each method takes the time a job
    arrives and returns when it is done."""

    def __init__(self, costs: RouterCosts):
        self.costs = costs
        self.t = 0.0  # when the latest job arrived
        self.backlog_s = 0.0  # work queued at self.t, that job's included
        self.busy_s = 0.0  # work done in all
        self.max_backlog_s = 0.0
        self.num_requests = self.num_refusals = self.num_events = 0

    def _submit(self, t: float, work_s: float) -> float:
        if t < self.t:  # an earlier job submitted late (a replica's laid-out steps): queued as of the latest
            t = self.t
        self.backlog_s = max(self.backlog_s - (t - self.t), 0.0) + work_s
        self.t = t
        self.busy_s += work_s
        self.max_backlog_s = max(self.max_backlog_s, self.backlog_s)
        return t + self.backlog_s

    def backlog_at(self, t: float) -> float:
        """Work ahead of a job arriving at t."""
        return max(self.backlog_s - (t - self.t), 0.0)

    def intake(self, t: float) -> float:
        """A client's request arrives at t: when the router sends it to a replica."""
        self.num_requests += 1
        return self._submit(t, self.costs.per_request_s)

    def refused(self, t: float) -> float:
        """A replica's 429 reaches the router at t: when it retries elsewhere or the client gets the 429."""
        self.num_refusals += 1
        return self._submit(t, self.costs.per_refusal_s)

    def relay(self, t: float, num_events: int) -> float:
        """num_events events (one per stream) reach the router at t: when their clients have them, on average.
        The router sends them one after another, so the k-th of n leaves k events into the job: a stream's token
        (in no particular place among them) leaves (n + 1) / 2 events in, not when the last one has."""
        self.num_events += num_events
        done = self._submit(t, num_events * self.costs.per_event_s)
        return done - (num_events - 1) * 0.5 * self.costs.per_event_s
