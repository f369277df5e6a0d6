"""The router's `--max-outstanding`: past that many requests in flight, a new one gets 503 at once.

As meshserve/router/app.py's AdmissionMiddleware does it: a request counts from the router taking it in until
its answer's last byte (a stream's last event), retries on other replicas included; the check comes first, so a
request that finds `max_outstanding` already in flight is refused (503 + Retry-After, RouterOverloadedError)
without queueing and without reaching a replica, and is not counted itself. Each router worker (`--workers N`)
keeps its own count and limit; which worker takes a request is the kernel's choice, modelled as round robin.
Off (None) by default: the simulated router then admits everything, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.errors import InvalidArgumentError


@dataclass
class RouterAdmission:
    """In-flight counts per router worker against `max_outstanding` (None: no limit)."""

    max_outstanding: int | None = None
    workers: int = 1
    in_flight: list[int] = field(default_factory=list)
    num_refused: int = 0
    _next: int = 0

    def __post_init__(self) -> None:
        if self.max_outstanding is not None and self.max_outstanding < 1:
            raise InvalidArgumentError("--max-outstanding must be >= 1", param="max_outstanding")
        if self.workers < 1:
            raise InvalidArgumentError("router workers must be >= 1", param="router_workers")
        self.in_flight = [0] * self.workers

    @property
    def enabled(self) -> bool:
        return self.max_outstanding is not None

    def admit(self) -> int | None:
        """A request reaches the router: the worker that counts it until release(), or None when that worker
        already has max_outstanding in flight (the client gets a 503 at once)."""
        w = self._next
        self._next = (w + 1) % self.workers
        if self.max_outstanding is not None and self.in_flight[w] >= self.max_outstanding:
            self.num_refused += 1
            return None
        self.in_flight[w] += 1
        return w

    def admits(self, in_flight: int) -> bool:
        """admit() for a caller that counts the requests in flight itself (one worker: the fleet counts them on
        its replicas, where every way a request ends is already seen)."""
        if self.max_outstanding is not None and in_flight >= self.max_outstanding:
            self.num_refused += 1
            return False
        return True

    def release(self, worker: int) -> None:
        """An admitted request's answer ended (whatever its outcome)."""
        self.in_flight[worker] -= 1
