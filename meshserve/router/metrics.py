"""Prometheus series of the router (own CollectorRegistry): outcomes, retries, fallback use, and the
autoscaling signal (queue depth and desired replicas) read from the replica pool.

One router process: the pool's figures are read at scrape time. With --workers N (router/workers.py), a
scrape reaches one worker at random, so every worker writes its series to prometheus_client's multiprocess
files (serve/multiprocess_metrics.py) and the one that answers merges them all, describing the whole router:
- counters (requests, retries, fallback, replica ejections) are summed over workers, dead ones included;
- requests in flight (queue depth, per-replica outstanding) are summed over live workers ("livesum");
- a replica's health is the minimum over live workers ("livemin"): 1 only while every worker routes to it,
  so a replica any worker has ejected shows at once, and healthy replica counts are derived from it;
- the replicas' own waiting queues (each worker probes the same replicas) are the most recent probe's;
- desired replicas are computed from the merged queue depth (a sum of per-worker ceilings would overshoot).
Each worker writes its pool's figures every PUBLISH_INTERVAL_S and before answering a scrape, so the other
workers' figures are at most that old.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshserve.router.pool import ReplicaPool
from meshserve.serve import multiprocess_metrics
from meshserve.serve.metrics import labelled_counter

# How a proxied request ended, as seen by the client.
OUTCOMES = ("ok", "client_error", "rejected", "unavailable", "stream_broken", "cancelled", "error")
# holds_response: a fallback replica keeps the response that the request names (response_affinity.py)
FALLBACK_REASONS = ("primaries_unavailable", "queue_depth", "decode_unavailable", "prefill_unavailable",
                    "holds_response")
POOLS = ("primary", "fallback", "prefill")
PUBLISH_INTERVAL_S = 0.25

_QUEUE_DEPTH = ("meshserve:router_queue_depth",
                "Requests in flight on primary replicas through this router (the autoscaling signal).")
_WAITING = ("meshserve:router_upstream_waiting",
            "Sum of the primaries' own waiting queues (vllm:num_requests_waiting, last probe).")
_HEALTHY = ("meshserve:router_replica_healthy",
            "1 if the replica takes traffic (several workers: from every worker).")
_OUTSTANDING = ("meshserve:router_replica_outstanding", "Requests in flight on the replica.")
_EJECTIONS = ("meshserve:router_replica_ejections", "Times the replica was ejected (summed over workers).")


def _gauge(name: str, doc: str, value: float, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels) or None)
    g.add_metric([], float(value))
    return g


def _scaling(queue_depth: float, target: int) -> Iterator[Metric]:
    yield _gauge("meshserve:router_desired_replicas",
                 "ceil(queue depth / target per replica), at least 1: a replica count for an HPA or KEDA "
                 "rule.",
                 max(1, math.ceil(queue_depth / target)))
    yield _gauge("meshserve:router_target_queue_per_replica", "The per-replica queue-depth target.", target)


def _healthy_by_pool(healthy: Iterable[tuple[str, float]]) -> GaugeMetricFamily:
    """(pool, 0/1 per replica) -> the healthy replica count of each pool."""
    counts = dict.fromkeys(POOLS, 0.0)
    for pool, up in healthy:
        counts[pool] = counts.get(pool, 0.0) + up
    family = GaugeMetricFamily("meshserve:router_healthy_replicas", "Healthy replicas by pool.",
                               labels=["pool"])
    for pool, n in counts.items():
        family.add_metric([pool], n)
    return family


class _PoolCollector(Collector):
    """One router process: the pool's figures, read at scrape time."""

    def __init__(self, pool: ReplicaPool):
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        p = self.pool
        yield _gauge(*_QUEUE_DEPTH, p.queue_depth())
        yield _gauge(*_WAITING, p.upstream_waiting())
        yield from _scaling(p.queue_depth(), p.config.target_queue_per_replica)
        yield _healthy_by_pool((r.pool, float(r.healthy)) for r in p.all())
        up = GaugeMetricFamily(*_HEALTHY, labels=["replica", "pool"])
        outstanding = GaugeMetricFamily(*_OUTSTANDING, labels=["replica", "pool"])
        ejections = CounterMetricFamily(*_EJECTIONS, labels=["replica", "pool"])
        for r in p.all():
            up.add_metric([r.name, r.pool], float(r.healthy))
            outstanding.add_metric([r.name, r.pool], float(r.outstanding))
            ejections.add_metric([r.name, r.pool], float(r.num_ejections))
        yield from (up, outstanding, ejections)


class _MergedCollector(Collector):
    """Several workers: every worker's series merged, plus those derived from the merged ones."""

    def __init__(self, target_queue_per_replica: int):
        self.target = target_queue_per_replica

    def collect(self) -> Iterator[Metric]:
        merged = multiprocess_metrics.merged_metrics()
        by_name = {m.name: m for m in merged}
        yield from merged
        depth = by_name.get(_QUEUE_DEPTH[0])
        yield from _scaling(sum(s.value for s in depth.samples) if depth else 0.0, self.target)
        healthy = by_name.get(_HEALTHY[0])
        yield _healthy_by_pool((s.labels["pool"], s.value) for s in (healthy.samples if healthy else ()))


class _PoolGauges:
    """Several workers: this worker's pool figures, written to its multiprocess files by `publish`."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.queue_depth = Gauge(*_QUEUE_DEPTH, registry=r, multiprocess_mode="livesum")
        self.waiting = Gauge(*_WAITING, registry=r, multiprocess_mode="livemostrecent")
        self.healthy = Gauge(*_HEALTHY, ["replica", "pool"], registry=r, multiprocess_mode="livemin")
        self.outstanding = Gauge(*_OUTSTANDING, ["replica", "pool"], registry=r, multiprocess_mode="livesum")
        self.ejections = Counter(*_EJECTIONS, ["replica", "pool"], registry=r)
        self._ejections_counted: dict[tuple[str, str], int] = {}
        self._published: set[tuple[str, str]] = set()

    def publish(self, pool: ReplicaPool) -> None:
        self.queue_depth.set(pool.queue_depth())
        self.waiting.set(pool.upstream_waiting())
        seen = set()
        for r in pool.all():
            key = (r.name, r.pool)
            seen.add(key)
            self.healthy.labels(*key).set(float(r.healthy))
            self.outstanding.labels(*key).set(r.outstanding)
            counted = self._ejections_counted.get(key, 0)
            if r.num_ejections > counted:  # the counter follows the replica's own count
                self.ejections.labels(*key).inc(r.num_ejections - counted)
                self._ejections_counted[key] = r.num_ejections
        for key in self._published - seen:  # gone from discovery (multiprocess files cannot drop a
            self.healthy.labels(*key).set(0.0)  # series): no traffic, nothing in flight
            self.outstanding.labels(*key).set(0.0)
        self._published |= seen


class RouterMetrics:
    """All series of one router (process, or worker of several)."""

    def __init__(self, pool: ReplicaPool) -> None:
        self.pool = pool
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = labelled_counter("meshserve:router_requests", "Proxied requests by outcome.",
                                         "outcome", OUTCOMES, r)
        self.retries = Counter("meshserve:router_retries", "Attempts beyond the first of a request.",
                               registry=r)
        self.fallback = labelled_counter("meshserve:router_fallback_requests",
                                         "Attempts sent to the fallback pool.", "reason", FALLBACK_REASONS, r)
        self._gauges: _PoolGauges | None = None
        if multiprocess_metrics.active():
            self._gauges = _PoolGauges(r)
            self._merged = _MergedCollector(pool.config.target_queue_per_replica)
        else:
            r.register(_PoolCollector(pool))

    @property
    def shared(self) -> bool:
        """Whether this is one of several workers (its pool figures published for the others' scrapes)."""
        return self._gauges is not None

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def publish(self) -> None:
        """Several workers: write this worker's pool figures for the others' scrapes (no-op otherwise)."""
        if self._gauges is not None:
            self._gauges.publish(self.pool)

    async def publish_forever(self) -> None:
        while True:
            self.publish()
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    def render(self) -> bytes:
        if self._gauges is None:
            return generate_latest(self.registry)
        self.publish()
        merged = CollectorRegistry()
        merged.register(self._merged)
        return generate_latest(merged)
