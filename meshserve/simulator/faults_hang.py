"""The router fault suite's hung replica on the closed loop (faults.py's ClosedLoop).

tests/router/test_router_faults.py's test_hung_replica_is_ejected_by_timeout_and_readmitted: 9 clients, every 4th
request a 64-token stream; once 30 were sent the victim is SIGSTOPped for the rest of the load (alive, its port
open, answering nothing); the load runs until the router has ejected it and 60 more were sent, then waits for
every request. Nothing of the victim's is seen after the stop (ClosedLoop.hang): the router's read timeout ends
each request it holds (a committed stream with its error event, from its last token; any other request goes to
another replica, from its attempt's start), and the probes eject it (faults.probe_ejection_s). Least outstanding
keeps choosing it while its count ties the lowest, so a request sent to it before the ejection waits out the
timeout too. The SIGCONT and the re-admission come after the load, outside the figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshserve.engine.step_time import StepShape
from meshserve.simulator.config import SimConfig
from meshserve.simulator.faults import SUITE_HEALTH, ClosedLoop, ClosedLoopLoad, FaultRun, RouterHealth

HUNG_LOAD = ClosedLoopLoad(concurrency=9, stream_every=4, output_len=8, stream_output_len=64)


@dataclass(frozen=True)
class HungReplica:
    """The suite's hang: the victim stops once `hang_after_sent` were sent; the load stops `after_ejection`
    requests after the router ejected it."""

    victim: int = 2
    hang_after_sent: int = 30
    after_ejection: int = 60


class HungRun(ClosedLoop):
    def __init__(self, *args, scenario: HungReplica, **kwargs):
        super().__init__(*args, **kwargs)
        self.scenario = scenario
        self.stop_after: int | None = None  # requests sent when the load stops (known at the ejection)

    def phase(self) -> str:
        if "hang_s" not in self.events:
            return "start"
        return "ejected" if "ejected_s" in self.events else "hung"

    def on_sent(self, t: float) -> None:
        if "hang_s" not in self.events and len(self.reqs) >= self.scenario.hang_after_sent:
            self.events["hang_s"], self.events["hang_sent"] = t, len(self.reqs)
            self.hang(self.scenario.victim, t)
        self.check_stop()

    def eject(self, slot: int, t: float) -> None:
        first = "ejected_s" not in self.events
        super().eject(slot, t)
        if first and "ejected_s" in self.events:
            self.events["ejected_sent"] = len(self.reqs)
            self.stop_after = len(self.reqs) + self.scenario.after_ejection
            self.check_stop()

    def check_stop(self) -> None:
        if self.stop_after is not None and len(self.reqs) >= self.stop_after:
            self.stopped = True


def run_hung(config: SimConfig, step_cost: Callable[[StepShape], float], load: ClosedLoopLoad = HUNG_LOAD,
             scenario: HungReplica = HungReplica(), health: RouterHealth = SUITE_HEALTH, latency_s: float = 0.0,
             limit_s: float = 3600.0) -> FaultRun:
    """Simulate the hung-replica scenario (faults.ClosedLoop's arguments)."""
    return HungRun(config, step_cost, load, health, latency_s, scenario=scenario).run(limit_s)
