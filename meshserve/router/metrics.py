"""Prometheus series of the router (own CollectorRegistry): outcomes, retries, fallback use, and the
autoscaling signal (queue depth and desired replicas) read from the replica pool at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshserve.router.pool import ReplicaPool
from meshserve.serve.metrics import labelled_counter

# How a proxied request ended, as seen by the client.
OUTCOMES = ("ok", "client_error", "rejected", "unavailable", "stream_broken", "cancelled", "error")
FALLBACK_REASONS = ("primaries_unavailable", "queue_depth", "decode_unavailable", "prefill_unavailable")


class _PoolCollector(Collector):
    def __init__(self, pool: ReplicaPool):
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        p = self.pool
        families = [
            ("meshserve:router_queue_depth",
             "Requests in flight on primary replicas through this router (the autoscaling signal).",
             p.queue_depth()),
            ("meshserve:router_upstream_waiting",
             "Sum of the primaries' own waiting queues (meshserve:num_requests_waiting, last probe).",
             p.upstream_waiting()),
            ("meshserve:router_desired_replicas",
             "ceil(queue depth / target per replica), at least 1: a replica count for an HPA or KEDA rule.",
             p.desired_replicas()),
            ("meshserve:router_target_queue_per_replica", "The per-replica queue-depth target.",
             p.config.target_queue_per_replica),
        ]
        for name, doc, value in families:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        healthy = GaugeMetricFamily("meshserve:router_healthy_replicas", "Healthy replicas by pool.",
                                    labels=["pool"])
        for pool_name, replicas in (("primary", p.primaries), ("fallback", p.fallbacks), ("prefill", p.prefills)):
            healthy.add_metric([pool_name], float(sum(r.healthy for r in replicas)))
        yield healthy
        up = GaugeMetricFamily("meshserve:router_replica_healthy", "1 if the replica takes traffic.",
                               labels=["replica", "pool"])
        outstanding = GaugeMetricFamily("meshserve:router_replica_outstanding",
                                        "Requests in flight on the replica.", labels=["replica", "pool"])
        ejections = CounterMetricFamily("meshserve:router_replica_ejections",
                                        "Times the replica was ejected.", labels=["replica", "pool"])
        for r in p.all():
            up.add_metric([r.name, r.pool], float(r.healthy))
            outstanding.add_metric([r.name, r.pool], float(r.outstanding))
            ejections.add_metric([r.name, r.pool], float(r.num_ejections))
        yield up
        yield outstanding
        yield ejections


class RouterMetrics:
    """All series of one router."""

    def __init__(self, pool: ReplicaPool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = labelled_counter("meshserve:router_requests", "Proxied requests by outcome.",
                                         "outcome", OUTCOMES, r)
        self.retries = Counter("meshserve:router_retries", "Attempts beyond the first of a request.",
                               registry=r)
        self.fallback = labelled_counter("meshserve:router_fallback_requests",
                                         "Attempts sent to the fallback pool.", "reason", FALLBACK_REASONS, r)
        r.register(_PoolCollector(pool))

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
