"""A host's CPU cores shared by its processes: the step time of a replica whose steps are host-bound.

On a CPU box (the router fault suite's: three tiny-llama replicas, two router workers and the client on two cores)
a replica's step is CPU work that competes with every other busy process. Processor sharing: with `busy` processes
wanting a core each on `cores` cores, each gets min(1, cores / busy) of one, so a CPU-bound step takes
max(1, busy / cores) times its time on a core of its own. A step cadence measured with `baseline` processes busy
(the fit's: every replica alive) already carries that baseline's factor; at another moment the step takes

    slowdown = max(1, busy / cores) / max(1, baseline / cores)

times the fitted cadence: below 1 with a replica dead (its share goes to the others), back to 1 while the restarted
process imports and loads (one busy process again), 1 whenever busy and baseline both fit in the cores.

What counts as busy (SharedHost.busy): the replicas that have work (a stopped or dead one does not), the processes
starting (a restart, from its launch to /ready), and `other_busy` processes busy all the time (the router's
workers, the client). The factor is taken at a step's start and holds for the step (the steps are milliseconds,
the changes of the count seconds apart). Only the step time is scaled: the fixed per-request latency of the fault
replays (router, HTTP, tokenizing) is not. Off (no SharedHost) everywhere but the CPU box's fault replays: GPU
replicas do not share their device, and their hosts' cores are not what their steps wait on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SharedHost:
    """`cores` cores shared by the replicas and `other_busy` processes busy throughout; `baseline_replicas` busy
    replicas when the step cadence was measured (None: all of the run's)."""

    cores: int
    other_busy: int = 0
    baseline_replicas: int | None = None

    def __post_init__(self) -> None:
        if self.cores < 1 or self.other_busy < 0:
            raise ValueError(f"SharedHost needs cores >= 1 and other_busy >= 0 (got {self.cores}, {self.other_busy})")

    def share(self, busy: int) -> float:
        """The share of one core each of `busy` CPU-bound processes gets."""
        return min(1.0, self.cores / busy) if busy > 0 else 1.0

    def factor(self, busy: int) -> float:
        """A CPU-bound step's time with `busy` processes busy over its time on a core of its own."""
        return 1.0 / self.share(busy)

    def busy(self, replicas_busy: int, starting: int = 0) -> int:
        """Processes busy: the replicas with work, those starting, and the others."""
        return replicas_busy + starting + self.other_busy

    def slowdown(self, replicas_busy: int, starting: int, num_replicas: int) -> float:
        """The step time's factor now (replicas_busy with work, `starting` processes starting) over the fit's (the
        baseline replicas, else all num_replicas, busy; none starting)."""
        baseline = num_replicas if self.baseline_replicas is None else self.baseline_replicas
        return self.factor(self.busy(replicas_busy, starting)) / self.factor(self.busy(baseline))


def fault_suite_host(cores: int = 2, router_workers: int = 2, clients: int = 1) -> SharedHost:
    """The router fault suite's CPU box (tests/router/test_router_faults.py, tools/fault_load_trace.py): two cores,
    the router's two workers (`--workers`' default there, min(4, cores)) and the load's client (one asyncio process)
    besides the primaries; the idle fallback replica does not count. Six busy processes with the three primaries up:
    a dead one's share makes its peers' steps 5/6 (0.83) as long, as measured (the peers' step time over the
    cadence, pooled over the three kill+restart rounds: 0.85 of the pre-kill phase's with the victim dead, 1.00
    while it restarts; validation_faults.phase_slowdowns)."""
    return SharedHost(cores=cores, other_busy=router_workers + clients)
