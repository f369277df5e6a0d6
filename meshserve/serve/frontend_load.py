"""How far behind this API process is, so admission sees delay the engine's clock cannot.

A saturated API process (HTTP parsing, JSON, SSE writes, detokenization on one GIL) delays requests before
they reach the engine core and delays their tokens after: the core's queue may be empty while clients wait
seconds. Two signals, each the worst value of the last `window_s` seconds:
- input delay: how long recent requests took from arrival (the first ASGI call, stamped in ARRIVAL) to their
  handler, i.e. what a request arriving now will likely wait before the engine sees it;
- loop lag: how late a timer on this event loop fires, i.e. how late a first token will leave once made.
Their sum plus the engine's predicted queue wait and prefill is this request's predicted time to first token;
past the target, the front end answers 429 itself, before reading the body (`GateMiddleware`).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable

# time.monotonic() when this request's first ASGI call ran (set by GateMiddleware, read by its handler)
ARRIVAL: contextvars.ContextVar[float | None] = contextvars.ContextVar("meshserve_arrival", default=None)


class WindowMax:
    """The largest value added in the last window_s seconds (two half-window buckets: cheap, and it forgets)."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.half = window_s / 2
        self.clock = clock
        self._start = clock()
        self._current = 0.0
        self._previous = 0.0

    def _roll(self, now: float) -> None:
        if now - self._start >= self.half:
            self._previous = self._current if now - self._start < 2 * self.half else 0.0
            self._current = 0.0
            self._start = now

    def add(self, value: float) -> None:
        self._roll(self.clock())
        self._current = max(self._current, value)

    def value(self) -> float:
        self._roll(self.clock())
        return max(self._current, self._previous)


class FrontendLoad:
    """Input delay and event-loop lag of this API process (see the module's docstring)."""

    def __init__(self, window_s: float = 1.0, tick_s: float = 0.005, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.tick_s = tick_s
        self.input_delay = WindowMax(window_s, clock)
        self.loop_lag = WindowMax(window_s, clock)
        self._watcher: asyncio.Task | None = None

    def ensure_watching(self) -> None:
        """Start the loop-lag watcher on the running loop (once; called from the first request)."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            t = self.clock()
            await asyncio.sleep(self.tick_s)
            self.loop_lag.add(max(0.0, self.clock() - t - self.tick_s))

    def request_reached_handler(self, arrival: float) -> None:
        self.input_delay.add(self.clock() - arrival)

    def delay_s(self) -> float:
        """What a request arriving now is predicted to lose in this process: before the core and after."""
        return self.input_delay.value() + self.loop_lag.value()
