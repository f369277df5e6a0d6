"""A run of decode steps of one fixed batch, in closed form: step end times, the step in flight, token delivery.

While nobody waits and every running sequence decodes, each step decodes the same n sequences and reads n more
KV tokens than the one before, so the step-time model's time is linear in the step's index: d(j) = a + b j
(StepCost.decode_line), and step j of the segment ends at start + j a + b j (j + 1) / 2. The fast replica
(fast_replica.py) keeps one such segment between events (a finish ends it, an arrival cuts it after the step in
flight) instead of an event, or a list entry, per step; the reference lays steps out one by one (replica.py).
Tokens reach the client through the API process's queue (frontend.py): once that queue is idle when a step ends
and steps last longer than their tokens' work, every later step is seen its work after it ends, so its gaps are
the step durations again (closed form); until then (a backlog, or a saturated front end) step by step.
"""

from __future__ import annotations

import math

from meshserve.simulator.frontend import FrontEnd
from meshserve.simulator.metrics import RunRecorder


class DecodeSegment:
    """Steps 1..total of n decoding sequences from start_s, step j lasting a + b j seconds; `delivered`: steps
    whose tokens the client has been handed (deliver)."""

    __slots__ = ("a", "b", "delivered", "n", "start_s", "total")

    def __init__(self, start_s: float, a: float, b: float, n: int, total: int):
        self.start_s = start_s
        self.a = a
        self.b = b
        self.n = n
        self.total = total
        self.delivered = 0

    def end_s(self, k: int) -> float:
        """When step k ends (k = 0: the start)."""
        return self.start_s + k * self.a + self.b * (k * (k + 1) // 2)

    def steps_ended_before(self, t: float) -> int:
        """How many of the segment's steps end before t (strictly), at most total."""
        x = t - self.start_s
        if x <= 0:
            return 0
        c = self.a + 0.5 * self.b
        k = min(int(2 * x / (c + math.sqrt(c * c + 2 * self.b * x))), self.total)  # root of b/2 k^2 + c k = x
        while k < self.total and self.end_s(k + 1) < t:  # the root's rounding, fixed on the exact times
            k += 1
        while k > 0 and self.end_s(k) >= t:
            k -= 1
        return k

    def deliver(self, upto: int, frontend: FrontEnd | None, recorder: RunRecorder, last_seen: float) -> float:
        """Hand the client the tokens of steps delivered+1..upto (each of the n sequences gets one per step, so
        n inter-token gaps a step); returns the client time of step upto's tokens (last_seen: the step before)."""
        k = self.delivered
        if upto <= k:
            return last_seen
        n, a, b = self.n, self.a, self.b
        self.delivered = upto
        if frontend is None:  # the client sees each step when it ends
            recorder.add_itl_count(self.end_s(k + 1) - last_seen, n)
            if upto > k + 1:
                recorder.add_itl_linear(a + b * (k + 2), b, upto - k - 1, n)
            return self.end_s(upto)
        work = n * frontend.costs.per_token_s
        done = frontend.t + frontend.backlog_s  # when the API process's queue empties
        frontend.busy_s += work * (upto - k)
        while k < upto:
            k += 1
            t = self.end_s(k)
            idle = done <= t
            seen = max(done, t) + work
            recorder.add_itl_count(seen - last_seen, n)
            last_seen = done = seen
            if idle and k < upto and a + b * (k + 1) >= work:  # idle from here on: seen = end + work
                recorder.add_itl_linear(a + b * (k + 1), b, upto - k, n)
                last_seen = done = self.end_s(upto) + work
                break
        frontend.t = self.end_s(upto)
        frontend.backlog_s = done - frontend.t
        return last_seen
