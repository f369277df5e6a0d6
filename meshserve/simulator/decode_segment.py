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
from bisect import bisect_left
from itertools import accumulate

from meshserve.simulator.frontend import FrontEnd
from meshserve.simulator.metrics import RunRecorder


class DecodeSegment:
    """Steps 1..total of n decoding sequences from start_s, step j lasting a + b j seconds; `delivered`: steps
    whose tokens the client has been handed (deliver).

    A segment may start with a head: the mixed step that admitted the last waiting request(s) (head_s long, its
    tokens sampled by head_gaps decoders and the newly prefilled `first_tokens`, which decode from step 2 on),
    so that step and the decode steps after it are one event; step j >= 2 still lasts a + b j.

    The fast replica restarts one object for each of its segments (restart): making one costs several times
    as much in CPython 3.11."""

    __slots__ = (
        "a",
        "b",
        "delivered",
        "first_tokens",
        "head_end_s",
        "head_gaps",
        "head_tokens",
        "n",
        "origin_s",
        "start_s",
        "total",
    )

    def __init__(
        self,
        start_s: float,
        a: float,
        b: float,
        n: int,
        total: int,
        head_s: float | None = None,
        head_gaps: int = 0,
        first_tokens: list | None = None,
    ):
        self.restart(start_s, a, b, n, total, head_s, head_gaps, first_tokens)

    def restart(
        self,
        start_s: float,
        a: float,
        b: float,
        n: int,
        total: int,
        head_s: float | None = None,
        head_gaps: int = 0,
        first_tokens: list | None = None,
    ) -> None:
        """Make this the segment of these arguments (the constructor's), nothing delivered."""
        self.start_s = start_s
        self.a = a
        self.b = b
        self.n = n
        self.total = total
        self.delivered = 0
        self.first_tokens = first_tokens
        # step k >= 1 ends at origin_s + k a + b k (k + 1) / 2 (a head shifts where the line starts)
        if head_s is None:
            self.origin_s = start_s
        else:  # (the head's fields are read only with a head)
            self.origin_s = origin = start_s + head_s - a - b
            self.head_end_s = origin + a + b  # end_s(1)
            self.head_gaps = head_gaps
            self.head_tokens = 0 if first_tokens is None else head_gaps + len(first_tokens)

    def end_s(self, k: int) -> float:
        """When step k ends (k = 0: the start)."""
        if k == 0:
            return self.start_s
        return self.origin_s + k * self.a + self.b * (k * (k + 1) // 2)

    def device_s(self, k: int) -> float:
        """Device time of steps 1..k: their wall time (no host gaps without noise)."""
        return self.end_s(k) - self.start_s

    def steps_ended_before(self, t: float) -> int:
        """How many of the segment's steps end before t (strictly), at most total."""
        x = t - self.origin_s
        if x <= 0.0:
            return 0
        a, b, total = self.a, self.b, self.total
        c = a + 0.5 * b
        k = math.floor(2.0 * x / (c + math.sqrt(c * c + 2.0 * b * x)))  # the root of b/2 k^2 + c k = x
        if k > total:  # noqa: PLR1730 - min() is a slow call in CPython 3.11
            k = total
        # the root's rounding, fixed on the step end times themselves (end_s, inlined: this runs per arrival)
        o = self.origin_s
        while k < total and o + (k + 1) * a + b * ((k + 1) * (k + 2) // 2) < t:
            k += 1
        while k > 0 and o + k * a + b * (k * (k + 1) // 2) >= t:
            k -= 1
        return k

    def steps_ended_since(self, t: float, k: int) -> int:
        """steps_ended_before(t), given that k steps ended before t: counted on from k when t is within two
        steps of it (an arrival's admission, just after its intake delivered those k), else solved anew."""
        total = self.total
        if k < total:
            j = k + 1  # end_s(j) < t, inlined (this runs twice per arrival)
            if self.origin_s + j * self.a + self.b * (j * (j + 1) // 2) < t:
                if j < total:
                    j += 1
                    if self.origin_s + j * self.a + self.b * (j * (j + 1) // 2) < t:
                        return self.steps_ended_before(t)
                return k + 1
        return k

    def deliver(
        self, upto: int, frontend: FrontEnd | None, recorder: RunRecorder, last_seen: float, end: float | None = None
    ) -> float:
        """Hand the client the tokens of steps delivered+1..upto (each of the n sequences gets one per step, so
        n inter-token gaps a step); returns the client time of step upto's tokens (last_seen: the step before).
        end: when step upto ends (end_s(upto)), where the caller has it: the segment's end is its event's time."""
        k = self.delivered
        if upto <= k:
            return last_seen
        self.delivered = upto
        a, b, start = self.a, self.b, self.origin_s
        gap_s, gap_counts = recorder.gap_s, recorder.gap_counts  # add_itl_count's lists, without its call
        if end is None:
            end = start + upto * a + b * (upto * (upto + 1) // 2)
        if frontend is None:  # the client sees each step when it ends
            if k == 0 and self.first_tokens is not None:
                last_seen, k = self._deliver_head(self.head_end_s, recorder, last_seen), 1
                if upto == 1:
                    return last_seen
            gap_s.append(start + (k + 1) * a + b * ((k + 1) * (k + 2) // 2) - last_seen)
            gap_counts.append(self.n)
            if upto > k + 1:
                recorder.add_itl_linear(a + b * (k + 2), b, upto - k - 1, self.n)
            return end
        done = frontend.t + frontend.backlog_s  # when the API process's queue empties
        if k == 0 and self.first_tokens is not None:
            # the head's tokens through the API process: frontend.submit(t, work), inlined (the same operations)
            t, work = self.head_end_s, self.head_tokens * frontend.costs.per_token_s
            backlog = frontend.backlog_s - (t - frontend.t)
            if backlog < 0.0:  # noqa: PLR1730 - max() is a slow call in CPython 3.11
                backlog = 0.0
            backlog += work
            frontend.busy_s += work
            seen = t + backlog  # _deliver_head(seen, recorder, last_seen), inlined
            if self.head_gaps:
                gap_s.append(seen - last_seen)
                gap_counts.append(self.head_gaps)
            for r in self.first_tokens:
                if r.first_seen < 0.0:
                    r.first_seen = seen
                else:  # recomputed after a preemption: the gap since its last token
                    recorder.add_itl(seen - r.last_seen)
            last_seen = done = seen
            k = 1
            if upto == 1:
                frontend.t, frontend.backlog_s = t, backlog
                return last_seen
        n = self.n
        work = n * frontend.costs.per_token_s
        frontend.busy_s += work * (upto - k)
        while k < upto:
            k += 1
            t = start + k * a + b * (k * (k + 1) // 2)
            if done <= t:  # the queue idle when the step ends: its tokens wait for nothing
                seen = t + work
                gap_s.append(seen - last_seen)
                gap_counts.append(n)
                if k < upto and (d := a + b * (k + 1)) >= work:  # idle from here on: seen = end + work
                    # recorder.add_itl_linear(d, b, upto - k, n), inlined
                    recorder.run_s.append(d)
                    recorder.run_slope_s.append(b)
                    recorder.run_steps.append(upto - k)
                    recorder.run_n.append(n)
                    last_seen = done = end + work
                    break
            else:
                seen = done + work
                gap_s.append(seen - last_seen)
                gap_counts.append(n)
            last_seen = done = seen
        frontend.t = end
        frontend.backlog_s = done - end
        return last_seen

    def _deliver_head(self, seen: float, recorder: RunRecorder, last_seen: float) -> float:
        """The head's tokens reach the client at seen: the decoders' gaps, the new sequences' first tokens."""
        if self.head_gaps:
            recorder.gap_s.append(seen - last_seen)
            recorder.gap_counts.append(self.head_gaps)
        for r in self.first_tokens:
            if r.first_seen < 0.0:
                r.first_seen = seen
            else:  # recomputed after a preemption: the gap since its last token
                recorder.add_itl(seen - r.last_seen)
        return seen


class NoisyDecodeSegment(DecodeSegment):
    """A DecodeSegment with step-time noise (step_noise.py): step j lasts what the replica's NoiseStream makes
    of a + b j for its step first_step + j - 1 (nobody waits during a segment), so its end times are a sum, laid
    out as far as asked (an arrival usually cuts a segment within tens of steps) instead of a closed form; its
    tokens are delivered step by step. A head (the mixed step that admitted the last waiting requests) comes
    with its own noisy time, head_s (device time head_device_s)."""

    __slots__ = ("device", "ends", "first_step", "noise")

    def __init__(
        self,
        start_s: float,
        a: float,
        b: float,
        n: int,
        total: int,
        noise,
        first_step: int,
        head_s: float | None = None,
        head_device_s: float = 0.0,
        head_gaps: int = 0,
        first_tokens: list | None = None,
    ):
        super().__init__(start_s, a, b, n, total, head_s, head_gaps, first_tokens)
        if head_s is not None:
            self.head_end_s = start_s + head_s  # end_s(1)
        self.noise = noise
        self.first_step = first_step
        self.ends: list[float] = [] if head_s is None else [start_s + head_s]  # ends[j - 1]: step j's end
        self.device: list[float] = [] if head_s is None else [head_device_s]

    def _lay_out(self, upto: int) -> None:
        ends = self.ends
        j = len(ends)
        if upto <= j:
            return
        a, b = self.a, self.b
        walls, devices = self.noise.apply_decode(
            self.first_step + j, [a + b * i for i in range(j + 1, upto + 1)]
        )
        self.device += devices
        ends += accumulate(walls, initial=ends[-1] if j else self.start_s)
        del ends[j]  # the initial value

    def end_s(self, k: int) -> float:
        if k == 0:
            return self.start_s
        if k > len(self.ends):
            self._lay_out(k)
        return self.ends[k - 1]

    def steps_ended_before(self, t: float) -> int:
        ends, total = self.ends, self.total
        while len(ends) < total and (not ends or ends[-1] < t):  # lay out in doubling chunks up to t
            self._lay_out(min(total, max(16, 2 * len(ends))))
        return min(bisect_left(ends, t), total)

    def steps_ended_since(self, t: float, k: int) -> int:
        return self.steps_ended_before(t)

    def device_s(self, k: int) -> float:
        """Device time of steps 1..k (laid out)."""
        return sum(self.device[:k])

    def deliver(
        self, upto: int, frontend: FrontEnd | None, recorder: RunRecorder, last_seen: float, end: float | None = None
    ) -> float:
        k = self.delivered
        if upto <= k:
            return last_seen
        ends = self.ends
        if upto > len(ends):
            self._lay_out(upto)
        if k == 0 and self.first_tokens is not None:  # the head: as DecodeSegment.deliver's
            last_seen = super().deliver(1, frontend, recorder, last_seen)
            k = 1
            if upto == 1:
                return last_seen
        n = self.n
        self.delivered = upto
        if frontend is None:  # the client sees each step when it ends
            recorder.add_itl_count_many(
                [t - s for t, s in zip(ends[k:upto], [last_seen, *ends[k : upto - 1]])], n
            )
            return ends[upto - 1]
        work = n * frontend.costs.per_token_s
        done = frontend.t + frontend.backlog_s  # when the API process's queue empties
        frontend.busy_s += work * (upto - k)
        gaps = []
        for t in ends[k:upto]:  # the queue's Lindley step: seen = max(t, done) + work
            done = max(done, t) + work
            gaps.append(done - last_seen)
            last_seen = done
        recorder.add_itl_count_many(gaps, n)
        end = ends[upto - 1]
        frontend.t = end
        frontend.backlog_s = done - end
        return last_seen
