"""ReplicaPool: the primary and fallback replicas, and the routing decision over them."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass

from meshserve.router.config import RouterConfig
from meshserve.router.policy import Policy, make_policy
from meshserve.router.replica import FALLBACK, PREFILL, PRIMARY, Replica

logger = logging.getLogger(__name__)


@dataclass
class Route:
    """Where one attempt goes; `fallback_reason` is set when the fallback pool serves it."""

    replica: Replica
    fallback_reason: str | None = None


class ReplicaPool:
    """Primaries take traffic while any is healthy and the queue is below the fallback threshold;
    otherwise the fallback pool (a smaller model) does; when neither can, `route` returns None."""

    def __init__(self, config: RouterConfig, policy: Policy | None = None):
        self.config = config
        self.policy = policy or make_policy(config.policy, config.affinity_slack)
        self.primaries = [Replica(u, PRIMARY, name=f"primary-{i}") for i, u in enumerate(config.backends)]
        self.fallbacks = [Replica(u, FALLBACK, name=f"fallback-{i}") for i, u in enumerate(config.fallbacks)]
        # disaggregation: prompts run here first, then the primaries (decode instances) pull their KV
        self.prefills = [Replica(u, PREFILL, name=f"prefill-{i}") for i, u in enumerate(config.prefills)]

    def all(self) -> list[Replica]:
        return self.primaries + self.fallbacks + self.prefills

    def find(self, name_or_url: str) -> Replica | None:
        return next((r for r in self.all() if name_or_url in (r.name, r.url)), None)

    # -- discovery -------------------------------------------------------------------------------
    def sync_primaries(self, urls: Collection[str], static: Collection[str] = ()) -> None:
        """Make the discovered primaries exactly `urls` (plus the static --backend ones)."""
        wanted = {u.rstrip("/") for u in urls} | {u.rstrip("/") for u in static}
        current = {r.url for r in self.primaries}
        for r in self.primaries:
            if r.url not in wanted:
                r.removed = True
                r.eject("gone from discovery")
        self.primaries = [r for r in self.primaries if r.url in wanted]
        for url in sorted(wanted - current):
            logger.info("discovered replica %s", url)
            self.primaries.append(Replica(url, PRIMARY, name=url))

    # -- load ------------------------------------------------------------------------------------
    def queue_depth(self) -> int:
        return sum(r.outstanding for r in self.primaries)

    def upstream_waiting(self) -> int:
        return sum(r.num_waiting for r in self.primaries if r.healthy)

    def desired_replicas(self) -> int:
        return max(1, math.ceil(self.queue_depth() / self.config.target_queue_per_replica))

    def healthy(self, pool: str) -> list[Replica]:
        replicas = self.primaries if pool == PRIMARY else self.fallbacks
        return [r for r in replicas if r.healthy]

    # -- routing ---------------------------------------------------------------------------------
    def route(self, key: int | None, tried: Collection[str] = ()) -> Route | None:
        """The replica for the next attempt of a request, skipping those it already tried."""
        primaries = [r for r in self.primaries if r.healthy and r.url not in tried]
        fallbacks = [r for r in self.fallbacks if r.healthy and r.url not in tried]
        threshold = self.config.fallback_queue_threshold
        if primaries and fallbacks and threshold is not None and self.queue_depth() >= threshold:
            return Route(self.policy.choose(fallbacks, key), "queue_depth")
        if primaries:
            return Route(self.policy.choose(primaries, key))
        if fallbacks:
            return Route(self.policy.choose(fallbacks, key), "primaries_unavailable")
        prefills = [r for r in self.prefills if r.healthy and r.url not in tried]
        if prefills:  # no decode instance: a prefill instance serves the whole request (colocated)
            return Route(self.policy.choose(prefills, key), "decode_unavailable")
        return None

    def route_prefill(self, key: int | None, tried: Collection[str] = ()) -> Replica | None:
        """The prefill instance for a request's prompt (least loaded, or prefix-affine), None if none is up."""
        prefills = [r for r in self.prefills if r.healthy and r.url not in tried]
        return self.policy.choose(prefills, key) if prefills else None
