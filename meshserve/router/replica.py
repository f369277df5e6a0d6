"""Replica: one upstream engine server as the router sees it (health, load, counters)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

PRIMARY = "primary"
FALLBACK = "fallback"
PREFILL = "prefill"  # prefill instances of a disaggregated deployment (router/disagg.py)


@dataclass
class Replica:
    """An upstream server: its address, pool, health state and the router's load on it.

    A replica starts unhealthy until its first good probe (a loading engine must not get traffic).
    `outstanding` counts requests the router has in flight on it; `num_waiting` is the engine's own
    waiting queue, scraped from its /metrics with each probe.
    """

    url: str
    pool: str = PRIMARY
    name: str = ""
    healthy: bool = False
    outstanding: int = 0
    num_waiting: int = 0
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_error: str | None = None
    ejected_at: float | None = None
    num_requests: int = 0  # attempts sent to it
    num_succeeded: int = 0  # attempts that reached the client
    num_failed: int = 0  # attempts that failed (connection, timeout, 5xx)
    num_ejections: int = 0
    num_admissions: int = 0
    removed: bool = False  # dropped by DNS discovery; kept alive only by requests still holding it
    since: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if not self.name:
            self.name = self.url

    # -- state changes (the single place that logs them) -------------------------------------------
    def eject(self, reason: str) -> None:
        """Mark unhealthy now (passive path: a request saw it fail, or probes crossed the threshold)."""
        self.last_error = reason
        self.consecutive_successes = 0
        if self.healthy:
            self.healthy = False
            self.ejected_at = time.monotonic()
            self.num_ejections += 1
            logger.warning("replica %s ejected: %s", self.name, reason)

    def admit(self) -> None:
        if not self.healthy:
            self.healthy = True
            self.ejected_at = None
            self.num_admissions += 1
            self.since = time.monotonic()
            logger.warning("replica %s admitted", self.name)

    def probe_succeeded(self, recover_threshold: int) -> None:
        self.consecutive_failures = 0
        self.consecutive_successes += 1
        # the very first probe admits at once: a replica that never failed needs no recovery period
        if not self.healthy and (self.consecutive_successes >= recover_threshold or self.num_admissions == 0):
            self.admit()

    def probe_failed(self, reason: str, fail_threshold: int) -> None:
        self.consecutive_successes = 0
        self.consecutive_failures += 1
        self.last_error = reason
        if self.healthy and self.consecutive_failures >= fail_threshold:
            self.eject(f"{self.consecutive_failures} failed health checks: {reason}")

    def snapshot(self) -> dict:
        return {"name": self.name, "url": self.url, "pool": self.pool, "healthy": self.healthy,
                "outstanding": self.outstanding, "num_waiting": self.num_waiting,
                "num_requests": self.num_requests, "num_succeeded": self.num_succeeded,
                "num_failed": self.num_failed, "num_ejections": self.num_ejections,
                "num_admissions": self.num_admissions, "last_error": self.last_error}
