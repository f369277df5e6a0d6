"""The router fault suite's slow kill+restart x3 on the closed loop (faults.py's KillRestartRun, once per replica).

tests/router/test_router_faults.py's test_replica_kill_restart_cycles_long: three kill+restart cycles back to back,
the victim primary-0, then 1, then 2. Each cycle is a load of its own (a new Load: 16 clients, request indices from
0, so every 4th request of the cycle streams) run as the default scenario runs one: the victim killed once
`total // 4` were sent and one of its streams is fresh, restarted at `total // 2`, the load kept up until `total`
were sent and the restarted replica served `after` again, then every request waited for. The next cycle starts when
the last one's last request ended (the test's checks between cycles are one HTTP call); the replicas, the router's
probe grid and its view of them carry over. The suite's figures are the three cycles' together, its seconds their
sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from meshserve.engine.step_time import StepShape
from meshserve.simulator.config import SimConfig
from meshserve.simulator.faults import (
    SUITE_HEALTH,
    ClosedLoopLoad,
    FaultRun,
    KillRestart,
    KillRestartRun,
    RouterHealth,
)
from meshserve.simulator.host_share import SharedHost

CYCLES_LOAD = ClosedLoopLoad(concurrency=16, stream_every=4, output_len=8, stream_output_len=200)


def suite_cycles(start_s: tuple[float, ...] = (8.0, 8.0, 8.0), total: int = 500,
                 after: int = 30) -> tuple[KillRestart, ...]:
    """The slow test's cycles: victim i in cycle i, each restart `start_s[i]` from the restart to /ready."""
    return tuple(KillRestart(victim=i, kill_after_sent=total // 4, restart_after_sent=total // 2, start_s=s,
                             stop_after_sent=total, stop_after_served=after) for i, s in enumerate(start_s))


@dataclass
class CyclesRun(FaultRun):
    """A FaultRun of several cycles: per cycle its victim, start and end times, first request and events (the
    run's times)."""

    cycles: list[dict] = field(default_factory=list)

    def cycle_of(self, index: int) -> int:
        return max(c for c, cy in enumerate(self.cycles) if cy["first"] <= index)

    def figures(self) -> dict:
        """The suite's figures of the cycles together, the seconds their sum (the test's total_s)."""
        fig = super().figures()
        fig["seconds"] = round(sum(cy["end_s"] - cy["start_s"] for cy in self.cycles), 1)
        return fig

    def cycle_figures(self, c: int) -> dict:
        cy = self.cycles[c]
        last = self.cycles[c + 1]["first"] if c + 1 < len(self.cycles) else len(self.requests)
        fig = FaultRun(self.requests[cy["first"]:last], cy["events"]).figures()
        fig["seconds"] = round(cy["end_s"] - cy["start_s"], 1)
        return fig


class KillRestartCyclesRun(KillRestartRun):
    def __init__(self, *args, cycles: tuple[KillRestart, ...], **kwargs):
        super().__init__(*args, scenario=cycles[0], **kwargs)
        self.cycle_specs = cycles
        self.cycles = [{"victim": cycles[0].victim, "start_s": 0.0, "first": 0}]

    def on_end(self, j: int, t: float) -> None:
        """After the cycle's last request ended: the next cycle's load, a fresh kill+restart of its victim."""
        super().on_end(j, t)
        if not self.stopped or any(math.isnan(r.end_s) for r in self.reqs[self.load_start:]):
            return
        self.cycles[-1].update(end_s=t, events=self.events)
        if len(self.cycles) == len(self.cycle_specs):
            return
        self.scenario = self.cycle_specs[len(self.cycles)]
        self.served_since_readmit = 0
        self.killed = self.restarted = self.kill_armed = self.stopped = False
        self.events = {}
        self.cycles.append({"victim": self.scenario.victim, "start_s": t, "first": len(self.reqs)})
        self.start_load(t)

    def run(self, limit_s: float = 3600.0) -> CyclesRun:
        run = super().run(limit_s)
        return CyclesRun(run.requests, run.events, run.steps, self.cycles)


def run_kill_restart_cycles(config: SimConfig, step_cost: Callable[[StepShape], float],
                            load: ClosedLoopLoad = CYCLES_LOAD, cycles: tuple[KillRestart, ...] = suite_cycles(),
                            health: RouterHealth = SUITE_HEALTH, latency_s: float = 0.0,
                            limit_s: float = 3600.0, host: SharedHost | None = None) -> CyclesRun:
    """Simulate the kill+restart cycles (faults.ClosedLoop's arguments)."""
    return KillRestartCyclesRun(config, step_cost, load, health, latency_s, cycles=cycles, host=host).run(limit_s)
