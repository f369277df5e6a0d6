"""The router fault suite's overload bursts on the closed loop (faults.py's ClosedLoop).

tests/router/test_router_faults.py's test_overload_gets_fast_refusals_with_retry_after_and_no_memory_growth: three
bursts back to back (a warm-up and two measured, all three in its figures), each 120 clients that send `limit`
requests in all, every 5th streamed, 8 tokens each; a client sends its next request as soon as its last one ends,
refused or not; a burst ends when its last request does. Two things refuse: the router past `--max-outstanding`
in flight (router_admission.py: a 503 at once, no replica tried) and the replicas' queues (`--max-queue-len`: a
429, so the router tries the next replica, at most `max_attempts`, then passes the last 429 on).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from meshserve.engine.step_time import StepShape
from meshserve.simulator.config import SimConfig
from meshserve.simulator.faults import SUITE_HEALTH, ClosedLoop, ClosedLoopLoad, FaultRun, RouterHealth
from meshserve.simulator.router_admission import RouterAdmission

OVERLOAD_LOAD = ClosedLoopLoad(concurrency=120, stream_every=5, output_len=8, stream_output_len=8)


@dataclass(frozen=True)
class Bursts:
    """`bursts` bursts of `limit` requests each (the suite's OVERLOAD_BURST)."""

    bursts: int = 3
    limit: int = 240


class BurstRun(ClosedLoop):
    def __init__(self, *args, scenario: Bursts, **kwargs):
        super().__init__(*args, **kwargs)
        self.scenario = scenario
        self.burst = 0
        self.burst_start_s = [0.0]

    def phase(self) -> str:
        return f"burst{self.burst}"

    def may_send(self) -> bool:
        return len(self.reqs) - self.load_start < self.scenario.limit

    def on_end(self, j: int, t: float) -> None:
        """The burst's last request ended: the next burst starts."""
        if self.may_send() or any(math.isnan(r.end_s) for r in self.reqs[self.load_start:]):
            return
        self.burst += 1
        if self.burst < self.scenario.bursts:
            self.burst_start_s.append(t)
            self.start_load(t)
        else:
            self.stopped = True


def run_bursts(config: SimConfig, step_cost: Callable[[StepShape], float], admission: RouterAdmission,
               load: ClosedLoopLoad = OVERLOAD_LOAD, scenario: Bursts = Bursts(),
               health: RouterHealth = SUITE_HEALTH, latency_s: float = 0.0, refusal_s: float = 0.0,
               front_s: float = 0.0, back_s: float = 0.0, limit_s: float = 3600.0) -> FaultRun:
    """Simulate the overload bursts (faults.ClosedLoop's arguments); refusal_s: a router 503's time to the
    client."""
    return BurstRun(config, step_cost, load, health, latency_s, admission, refusal_s, front_s, back_s,
                    scenario=scenario).run(limit_s)
