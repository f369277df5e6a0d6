"""Autoscaling on the router's queue depth, as deploy/k8s/autoscaling-keda.yaml runs it.

Every `polling_s` the autoscaler reads the router's queue depth (requests in flight on the serving replicas,
meshserve:router_queue_depth) and asks for max(1, ceil(depth / target_queue_per_replica)) replicas
(RouterPool.desired_replicas), clamped to [min, max]. A replica asked for takes its GPUs at once and serves
after `startup_s` (pod start + engine start to ready); scale-in waits `cooldown_s` after the last scale-up,
stops routing to the newest replicas and frees their GPUs once they have drained (checked at each poll).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from meshserve.simulator.replica import SimReplica


@dataclass(frozen=True)
class AutoscaleRule:
    """The manifests' defaults: --target-queue-per-replica 16, KEDA's 15 s polling and 300 s cooldown."""

    target_queue_per_replica: int = 16
    min_replicas: int = 1
    max_replicas: int = 8
    polling_s: float = 15.0
    cooldown_s: float = 300.0
    startup_s: float = 60.0  # an assumption: ~12 s engine start measured (8B), plus pod scheduling and image pull

    def desired(self, queue_depth: int) -> int:
        want = max(1, math.ceil(queue_depth / self.target_queue_per_replica))
        return min(max(want, self.min_replicas), self.max_replicas)


@dataclass
class Autoscaler:
    """Owns which replicas exist, serve, start or drain, and their GPU time."""

    rule: AutoscaleRule
    make_replica: Callable[[int], SimReplica]
    serving: list[SimReplica] = field(default_factory=list)
    starting: list[tuple[float, SimReplica]] = field(default_factory=list)  # (ready at, replica)
    draining: list[SimReplica] = field(default_factory=list)
    all_replicas: list[SimReplica] = field(default_factory=list)
    replica_seconds: float = 0.0  # GPU time of stopped replicas, in replica-seconds
    timeline: list[dict] = field(default_factory=list)
    _started_at: dict[int, float] = field(default_factory=dict)
    _next_poll: float = 0.0
    _last_scale_up: float = -math.inf

    def start(self, count: int) -> None:
        for _ in range(count):
            rep = self._new(0.0)
            self.serving.append(rep)

    def _new(self, now: float) -> SimReplica:
        rep = self.make_replica(len(self.all_replicas))
        self.all_replicas.append(rep)
        self._started_at[rep.index] = now
        return rep

    def advance_to(self, t: float) -> None:
        """Run the polls and start-ups due at or before t."""
        while True:
            ready_at = min((r for r, _ in self.starting), default=math.inf)
            if min(self._next_poll, ready_at) > t:
                return
            if ready_at <= self._next_poll:
                due = [rep for r, rep in self.starting if r == ready_at]
                self.starting = [(r, rep) for r, rep in self.starting if r != ready_at]
                self.serving.extend(due)
            else:
                self._poll(self._next_poll)
                self._next_poll += self.rule.polling_s

    def _poll(self, now: float) -> None:
        for rep in [r for r in self.draining if r.outstanding == 0 and not r.busy]:
            self.draining.remove(rep)
            self.replica_seconds += now - self._started_at.pop(rep.index)
        depth = sum(r.outstanding for r in self.serving) + sum(r.outstanding for r in self.draining)
        want = self.rule.desired(depth)
        have = len(self.serving) + len(self.starting)
        if want > have:
            self.starting += [(now + self.rule.startup_s, self._new(now)) for _ in range(want - have)]
            self._last_scale_up = now
        elif want < len(self.serving) and not self.starting and now - self._last_scale_up >= self.rule.cooldown_s:
            for _ in range(len(self.serving) - want):
                self.draining.append(self.serving.pop())
        self.timeline.append({"t": now, "queue_depth": depth, "desired": want, "serving": len(self.serving),
                              "starting": len(self.starting), "draining": len(self.draining)})

    def gpu_replica_seconds(self, end: float) -> float:
        """Replica-seconds of GPU time, replicas still up counted to `end`."""
        return self.replica_seconds + sum(end - t for t in self._started_at.values())
