"""How close to its time-to-first-token target a request's predicted TTFT may come and still be admitted.

The admission check (AsyncLLM) admits a request only while its predicted TTFT is at most margin x target. The
prediction misses what it cannot see: the step that carries the request's prefill, requests sent to the core
by other API processes since the core's last counters, bursts of admissions slower than the recent rate, and
the API process's own output path. With a fixed margin (0.8) W3 on an H200 past the knee admitted requests at
a predicted 0.80 s whose p99 TTFT came to 1.04-1.08 s against a 1 s target.

So the margin is fed back from what happened. For each admitted request whose prediction was near the limit
(at least `near` x target: under light load the margin decides nothing and the error there says little), the
front end records its error, (measured TTFT - predicted TTFT) / target, once its first token is out. The
margin that keeps the `quantile` of measured TTFT at `goal` x target is then goal - that quantile of the
errors (admitted means predicted <= margin x target, so measured <= (margin + error) x target). Every
`update_every` such requests the margin moves toward it by at most `max_step`, and always stays within
[low, high]: bounded, so one odd burst cannot close the door or open it wide.

Listeners (`add_listener`) hear of every update: the server exports the margin, the number of updates and
the error quantile of the last one as Prometheus series (serve/metrics.py), written when they change.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MarginRule:
    """The controller's constants (see the module docstring)."""

    initial: float = 0.8  # before anything was measured: the fixed margin of before
    low: float = 0.5
    high: float = 0.95
    goal: float = 0.97  # of the target, at the quantile: what is left covers the HTTP write and the network
    quantile: float = 0.99
    near: float = 0.4  # predictions under near x target do not count
    window: int = 256  # errors remembered
    min_samples: int = 32  # errors needed before the first move
    update_every: int = 16
    max_step: float = 0.05


class AdmissionMargin:
    """The admission margin, adapted to the measured TTFT of admitted requests (see the module docstring)."""

    def __init__(self, rule: MarginRule | None = None):
        self.rule = rule or MarginRule()
        self.value = self.rule.initial
        self._errors: collections.deque[float] = collections.deque(maxlen=self.rule.window)
        self._since_update = 0
        self.num_updates = 0
        # the `quantile` of the errors at the last update, (measured - predicted) / target; None before it
        self.last_error_quantile: float | None = None
        self._listeners: list[Callable[[AdmissionMargin], None]] = []

    def add_listener(self, fn: Callable[[AdmissionMargin], None]) -> None:
        """Call fn(self) after every update (on the thread that called observe())."""
        self._listeners.append(fn)

    def observe(self, predicted_s: float, measured_s: float, target_s: float) -> None:
        """An admitted request's first token is out: measured_s after its arrival, predicted_s at admission."""
        r = self.rule
        if target_s <= 0 or predicted_s < r.near * target_s:
            return
        self._errors.append((measured_s - predicted_s) / target_s)
        self._since_update += 1
        if self._since_update >= r.update_every and len(self._errors) >= r.min_samples:
            self._since_update = 0
            self.num_updates += 1
            self.last_error_quantile = float(np.quantile(np.fromiter(self._errors, float), r.quantile))
            wanted = r.goal - self.last_error_quantile
            step = min(max(wanted - self.value, -r.max_step), r.max_step)
            self.value = min(max(self.value + step, r.low), r.high)
            for fn in self._listeners:
                fn(self)

    def admits(self, predicted_s: float, target_s: float) -> bool:
        return predicted_s <= target_s * self.value
