"""RouterConfig: every knob of the router in one typed place (the CLI fills it from flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from meshserve.errors import InvalidArgumentError
from meshserve.router.discovery import split_host_port

POLICIES = ("least-outstanding", "prefix-affinity", "round-robin")


@dataclass
class RouterConfig:
    """What the router needs to pick replicas, judge their health and bound retries.

    Times are seconds. `read_timeout_s` is the longest silence allowed from a replica: before the response
    head of a non-streamed request (its whole generation), and between chunks of a stream. A request is
    retried on another replica only while nothing reached the client, at most `max_attempts` times (a
    refused connection does not count) and not after `retry_budget_s` since it arrived.
    """

    backends: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    discover: list[str] = field(default_factory=list)  # HOST:PORT resolved through DNS (headless Service)
    prefills: list[str] = field(default_factory=list)  # disaggregation: prefill instances (backends decode)
    # disaggregation: send the decode leg at once, beside the prefill leg (layer-wise KV transfer overlaps the
    # prefill only when the decode instance is already waiting for the layers)
    disagg_concurrent: bool = False
    fallback_model: str | None = None  # rewrite the request's `model` for the fallback pool
    policy: str = "least-outstanding"
    # health
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    fail_threshold: int = 2  # consecutive failed probes that eject a healthy replica
    recover_threshold: int = 2  # consecutive good probes that re-admit an ejected one
    # upstream calls and retries
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 120.0
    max_attempts: int = 3
    retry_budget_s: float = 30.0
    # load and degradation
    max_outstanding: int = 4096  # router-wide in-flight requests past which new ones get 503 at once
    fallback_queue_threshold: int | None = None  # primary queue depth past which the fallback serves
    affinity_slack: int = 4  # prefix-affinity target busier than least-loaded + slack -> least-loaded
    prefix_block_chars: int = 64
    prefix_block_tokens: int = 16
    prefix_max_blocks: int = 4
    target_queue_per_replica: int = 16  # autoscaling: desired replicas = ceil(queue depth / this)
    retry_after_s: int = 1
    # response affinity: response ids remembered with their replica (response_affinity.py says why bounded)
    response_affinity_size: int = 100_000
    drain_timeout_s: float = 30.0

    def validate(self) -> RouterConfig:
        if not (self.backends or self.discover):
            raise InvalidArgumentError("the router needs at least one --backend, --decode or --discover",
                                       param="backend")
        if self.policy not in POLICIES:
            raise InvalidArgumentError(f"--policy must be one of {', '.join(POLICIES)}", param="policy")
        positive = {"health_interval_s": self.health_interval_s, "health_timeout_s": self.health_timeout_s,
                    "connect_timeout_s": self.connect_timeout_s, "read_timeout_s": self.read_timeout_s,
                    "retry_budget_s": self.retry_budget_s}
        for name, value in positive.items():
            if not value > 0:  # NaN too: a NaN timeout or interval would fail only once serving
                raise InvalidArgumentError(f"{_flag(name)} must be > 0, got {value}", param=name)
        at_least_zero = {"drain_timeout_s": self.drain_timeout_s, "retry_after_s": self.retry_after_s,
                         "affinity_slack": self.affinity_slack}
        for name, value in at_least_zero.items():
            if not value >= 0:
                raise InvalidArgumentError(f"{_flag(name)} must be >= 0, got {value}", param=name)
        at_least_one = {"fail_threshold": self.fail_threshold, "recover_threshold": self.recover_threshold,
                        "max_attempts": self.max_attempts, "max_outstanding": self.max_outstanding,
                        "target_queue_per_replica": self.target_queue_per_replica,
                        "prefix_block_chars": self.prefix_block_chars,
                        "prefix_block_tokens": self.prefix_block_tokens,
                        "prefix_max_blocks": self.prefix_max_blocks,
                        "response_affinity_size": self.response_affinity_size}
        for name, value in at_least_one.items():
            if value < 1:
                raise InvalidArgumentError(f"{_flag(name)} must be >= 1, got {value}", param=name)
        if self.fallback_queue_threshold is not None and self.fallback_queue_threshold < 0:
            raise InvalidArgumentError("--fallback-queue-threshold must be >= 0", param="fallback_queue_threshold")
        seen: set[str] = set()
        for url in self.backends + self.fallbacks + self.prefills:
            check_replica_url(url)
            if url.rstrip("/") in seen:  # one server counted as two replicas: its load split, its health doubled
                raise InvalidArgumentError(f"replica {url!r} is given twice (--backend, --decode, --fallback and "
                                           "--prefill name each server once)", param="backend")
            seen.add(url.rstrip("/"))
        for target in self.discover:
            try:
                split_host_port(target)
            except ValueError as e:
                raise InvalidArgumentError(str(e), param="discover") from None
        if self.disagg_concurrent and not self.prefills:  # it was taken and did nothing
            raise InvalidArgumentError("--disagg-concurrent sends the decode leg beside a prefill leg: add --prefill "
                                       "URL", param="disagg_concurrent")
        if self.fallback_model and not self.fallbacks:
            raise InvalidArgumentError("--fallback-model renames requests for the fallback pool: add --fallback URL",
                                       param="fallback_model")
        return self


def _flag(field_name: str) -> str:
    """The command-line flag of a RouterConfig field (health_interval_s: --health-interval)."""
    return "--" + field_name.removesuffix("_s").replace("_", "-")


def check_replica_url(url: str) -> None:
    """url is http(s)://HOST[:PORT][/...] with a port in range (else the replica would only fail once probed)."""
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # out of range, or not a number
        port_ok = False
    # a space in the host ("http://a b:1") was taken, then every probe of it failed
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or any(c.isspace() for c in url):
        raise InvalidArgumentError(f"backend {url!r} must be an http(s)://HOST[:PORT] URL", param="backend")
    if parts.path.rstrip("/").endswith("/v1"):  # an OpenAI base_url habit: its probes of .../v1/ready never answer
        raise InvalidArgumentError(f"backend {url!r}: give the server's root URL, without /v1 (the router adds the "
                                   "API paths and probes /ready there)", param="backend")
