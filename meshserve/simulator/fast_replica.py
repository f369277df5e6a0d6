"""A fast model of one engine replica: the scheduler's FCFS chunked-prefill policy on aggregate state.

The reference (replica.py) drives the engine's own Scheduler; per simulated request that is a schedule() and an
update_after_step() over the whole batch, and a pass each to lay out and apply the decode run that follows.
This model makes the same decisions for the configuration it covers (fast_fleet.fast_model_gap says which:
FCFS, chunked prefill, no prefix caching, no SLO targets, one API process) on counters:
- a decoding sequence's KV tokens are L + S at step boundary S (its offset L is fixed while it decodes), so the
  batch's KV tokens are sum(L) + n S and every decode step is O(1); finishes come off a heap keyed by the step
  whose token ends them;
- at most one sequence is part-way through its prefill (the newest: a step that cannot finish a prompt spends
  the whole token budget on it, so nobody is admitted behind it), kept apart;
- between events the steps form a DecodeSegment in closed form (decode_segment.py): a finish ends it, an
  arrival cuts it after the step in flight, as the reference's decode runs do;
- KV blocks are not tracked: held blocks are sum(ceil(tokens / block_size)) over the running sequences, and a
  step is checked against the pool with an upper bound; only when the bound does not clear it does the step go
  through the scheduler's loop sequence by sequence, with its preemption (the newest running sequence back to
  the front of the queue, to be recomputed).
Inter-token gaps are counted per step (every running decoder gets a token every step), not per sequence.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from heapq import heappop, heappush

from meshserve.config import CacheConfig, SchedulerConfig
from meshserve.simulator.decode_segment import DecodeSegment, NoisyDecodeSegment
from meshserve.simulator.fast_steps import end_step, finish_decoders, first_finish, schedule
from meshserve.simulator.frontend import FrontEnd, FrontEndCosts
from meshserve.simulator.metrics import RunRecorder
from meshserve.simulator.step_noise import NoiseStream

# the kinds of the fleet's events (fast_fleet.py), in their order at equal times and replica: a request reaching
# the core through its API process, a step or decode segment ending, an idle replica waking
ADMIT, STEP_END, WAKE = -1, 0, 1


class Req:
    """One request on a replica. While it decodes (in `decoders`) its KV tokens are offset + S and `end_step`
    is the step whose token ends it; waiting or prefilling, `computed` and `out` hold its progress. `order`,
    `offset`, `end_step` and `last_seen` are set when scheduled, decoding and preempted, before they are read
    (a store less each: one Req per request)."""

    __slots__ = (
        "computed",
        "end_step",
        "first_seen",
        "last_seen",
        "max_out",
        "offset",
        "order",
        "out",
        "prompt",
        "sent",
    )

    def __init__(self, sent: float, prompt: int, max_out: int):
        self.sent = sent
        self.prompt = prompt
        self.max_out = max_out
        self.out = 0
        self.computed = 0
        self.first_seen = -1.0  # the client's time of its first token (-1: none yet)


class FastReplica:
    """The replica as the fleet sees it (fast_fleet.py): arrive (the common case in one call) or try_add /
    intake / interrupt for arrivals, start_step and next_step for its steps (fast_steps.py: one at a time where
    the closed forms do not apply), num_waiting / num_running for the timeline, busy_s / steps / frontend for the
    report. `outstanding` lives in the router's index (counts[index]). Slotted: CPython 3.11 shares an object's
    key table with its class's other objects up to 30 attributes, and past that specializes none of its
    attribute and method loads."""

    __slots__ = (
        "_decode_lines",
        "_on_finish",
        "_orders",
        "_plain_segment",
        "_scheduled",
        "_scheduled_decoders",
        "_segment_host_s",
        "_stale_free",
        "_step_shapes",
        "block_size",
        "budget",
        "busy",
        "busy_s",
        "decoders",
        "events",
        "finishing",
        "frontend",
        "held_slack",
        "index",
        "last_seen",
        "max_model_len",
        "max_queue_len",
        "max_request_tokens",
        "max_running",
        "next_end",
        "noise",
        "num_blocks",
        "num_preemptions",
        "partial",
        "pending",
        "recorder",
        "segment",
        "step",
        "step_cost",
        "sum_offset",
        "version",
        "waiting",
    )

    def __init__(
        self,
        index: int,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        step_cost,
        recorder: RunRecorder,
        max_queue_len: int,
        frontend: FrontEndCosts | None,
        on_finish: Callable[[int], None],
        noise: NoiseStream | None = None,
    ):
        self.index = index
        # the engine's running cap (max_num_seqs per step in flight; one step here: pipeline stages take the
        # reference, pipeline.py)
        self.max_running = scheduler_config.max_running
        self.budget = scheduler_config.max_num_batched_tokens
        self.max_model_len = scheduler_config.max_model_len
        self.block_size = cache_config.block_size
        self.num_blocks = cache_config.num_blocks
        # the longest request it queues (prompt + output): within the model's length and the whole KV pool
        self.max_request_tokens = min(self.max_model_len, self.num_blocks * self.block_size)
        # what a step adds to the blocks held at most beyond its decoders' tokens: its budget, and a block
        # partly filled per sequence
        self.held_slack = self.budget + self.max_running * self.block_size
        self.step_cost = step_cost
        self._decode_lines = step_cost.decode_lines  # decode_line's terms by batch size (read inline)
        self._step_shapes = step_cost.step_shapes  # step_s's terms by step shape (read inline)
        # step-time noise by step index (step_noise.py): the same draws as the reference replica's
        self.noise = noise
        self.recorder = recorder
        self.max_queue_len = max_queue_len
        self.frontend = FrontEnd(frontend) if frontend is not None and frontend.enabled else None
        self._on_finish = on_finish  # (replica index): a request finished, the router's count falls by one
        self.waiting: deque[Req] = deque()
        self.decoders: dict[int, Req] = {}  # by admission order (the newest last: preemption's victim)
        self.sum_offset = 0  # sum of the decoders' offsets: their KV tokens are sum_offset + n * S
        self.finishing: list[tuple[int, int]] = []  # heap of (end step, order) of decoders
        self._stale_free = True  # no entry in finishing is stale (no decoder was preempted or taken back yet)
        self.partial: Req | None = None  # part-way through its prefill (the newest running sequence)
        self.step = 0  # steps done (S), the step index of the noise's draws
        self.last_seen = 0.0  # the client's time of the last step's tokens
        self.busy = False  # a step in flight or a wake-up due (the fleet sets it to wake the replica)
        self.busy_s = 0.0
        self.num_preemptions = 0
        self.segment: DecodeSegment | None = None
        self._plain_segment = DecodeSegment(0.0, 0.0, 0.0, 0, 0)  # restarted for each noise-free segment
        self._segment_host_s = 0.0  # host time before the segment's head step (eager_steps.py): not the GPU's
        self._orders = 0
        self._scheduled: list[tuple[Req, int]] = []  # the explicit step in flight: prefill chunks
        self._scheduled_decoders = 0  # and how many decoders it carries
        # the fleet's side (fast_fleet.py): its event heap (set by the fleet), the version of this replica's one
        # live step event (older entries are stale), when that event is due (inf: idle), and the admissions
        # through its API process that are events of their own
        self.events: list[tuple] = []
        self.version = 0
        self.next_end = math.inf
        self.pending = 0

    @property
    def steps(self) -> int:
        """Steps done (the report's count; no step is in flight when it is read)."""
        return self.step

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.decoders) + (self.partial is not None)

    # -- arrivals --------------------------------------------------------------------------------
    def intake(self, t: float) -> float:
        """A request reaches the API process at t: when the core gets it (t itself without a front end)."""
        fe = self.frontend
        if fe is None:
            return t
        seg = self.segment
        if seg is not None:  # tokens of steps that ended before t are ahead of it in the queue
            k = seg.steps_ended_since(t, seg.delivered)  # (delivered: ended before an earlier intake)
            if k > seg.delivered:
                self.last_seen = seg.deliver(k, fe, self.recorder, self.last_seen)
        return fe.submit(t, fe.costs.per_request_s)  # one API process (FrontEnd.intake's own case)

    def arrive(self, t: float, sent: float, prompt: int, max_out: int) -> float:
        """The fleet's common case of a request reaching the API process at t (a front end, the router's first
        try): its intake, then, when nothing happens on this replica before the core gets it (no admission
        pending, no step or segment ending first) and the core will queue it, its admission as of then (the
        segment in flight cut, its events pushed on the fleet's heap). Returns -1.0 when admitted so, else when
        the core gets it (the fleet admits it then, or now when that is t). intake, will_take and the fleet's
        admit in one call: a request's arrival is a large share of a simulated request."""
        fe = self.frontend
        if fe is None:
            return t
        seg = self.segment
        plain = self.noise is None
        if seg is not None:  # tokens of steps that ended before t are ahead of it in the queue
            k = delivered = seg.delivered  # (ended before an earlier intake)
            if plain:  # seg.steps_ended_since(t, k), inlined: counted on from k by up to two steps, else solved
                total, o, a, b = seg.total, seg.origin_s, seg.a, seg.b
                if k < total:
                    j = k + 1
                    e = o + j * a + b * (j * (j + 1) // 2)  # when step k + 1 ends (seg.end_s): kept while k < total
                    if e < t:
                        k = j
                        if j < total:
                            j += 1
                            e = o + j * a + b * (j * (j + 1) // 2)
                            if e < t:
                                k = seg.steps_ended_before(t)
                                if k < total:
                                    e = o + (k + 1) * a + b * ((k + 1) * (k + 2) // 2)
            else:
                k = seg.steps_ended_since(t, k)
            if k > delivered:
                self.last_seen = seg.deliver(k, fe, self.recorder, self.last_seen)
        # fe.submit(t, per_request_s), inlined (the same operations)
        work = fe.costs.per_request_s
        backlog = fe.backlog_s - (t - fe.t)
        if backlog < 0.0:  # noqa: PLR1730 - max() is a slow call in CPython 3.11
            backlog = 0.0
        backlog += work
        fe.t, fe.backlog_s = t, backlog
        fe.busy_s += work
        reached = t + backlog
        waiting = self.waiting
        if (
            reached <= t
            or self.pending
            or self.next_end < reached
            or len(waiting) >= self.max_queue_len
            or prompt + max_out > self.max_request_tokens
        ):
            return reached
        if seg is not None:  # interrupt(reached): the segment ends after the step running then
            if plain:  # steps_ended_since(reached, k) + 1, inlined as above; e is end_s(keep) while keep < total
                keep = k + 1
                if keep < total and e < reached:
                    keep += 1
                    if keep < total:
                        e = o + keep * a + b * (keep * (keep + 1) // 2)
                        if e < reached:
                            keep = seg.steps_ended_before(reached) + 1
                            if keep < total:
                                e = o + keep * a + b * (keep * (keep + 1) // 2)
                if keep < total:
                    seg.total = keep
                    v = self.version = self.version + 1
                    self.next_end = e
                    heappush(self.events, (e, self.index, STEP_END, v))
            else:
                cut = self.interrupt(reached)
                if cut is not None:
                    v = self.version = self.version + 1
                    self.next_end = cut
                    heappush(self.events, (cut, self.index, STEP_END, v))
        waiting.append(Req(sent, prompt, max_out))
        if not self.busy:  # wake it after every arrival of this instant is queued
            self.busy = True
            v = self.version = self.version + 1
            self.next_end = reached
            heappush(self.events, (reached, self.index, WAKE, v))
        return -1.0

    def will_take(self, prompt: int, max_out: int) -> bool:
        """Whether try_add would queue this request now."""
        return len(self.waiting) < self.max_queue_len and prompt + max_out <= self.max_request_tokens

    def try_add(self, sent: float, prompt: int, max_out: int) -> bool:
        """Queue a request (sent at `sent`), or refuse it as the server would (429 queue full, 400 too long)."""
        if len(self.waiting) >= self.max_queue_len:
            return False
        if prompt + max_out > self.max_request_tokens:
            return False
        self.waiting.append(Req(sent, prompt, max_out))
        return True

    def interrupt(self, now: float) -> float | None:
        """A request arrived at now: the decode segment in flight ends after the step running at now. Returns
        its new end, or None when no segment is in flight or its end is unchanged."""
        seg = self.segment
        if seg is None:
            return None
        keep = seg.steps_ended_since(now, seg.delivered) + 1  # (delivered: ended before an earlier intake)
        if keep >= seg.total:
            return None
        seg.total = keep
        if self.noise is not None:
            return seg.end_s(keep)
        return seg.origin_s + keep * seg.a + seg.b * (keep * (keep + 1) // 2)  # seg.end_s(keep), inlined

    # -- steps -----------------------------------------------------------------------------------
    def start_step(self, now: float) -> float | None:
        """Start the next step at now; returns when it ends, None when idle. With nobody waiting or part-way
        through a prompt, that is a decode segment up to the next finish, if the KV pool holds all of its steps
        (one test of an upper bound, or of the exact sum near capacity); else one step as the scheduler does."""
        decoders = self.decoders
        if decoders and not self.waiting and self.partial is None:
            end = self.finishing[0][0] if self._stale_free else first_finish(self)
            n, s, bs = len(decoders), self.step, self.block_size
            k = end - s
            base = self.sum_offset + n * s
            if (base + n * (k + bs - 1)) // bs <= self.num_blocks or sum(
                -(-(r.offset + end) // bs) for r in decoders.values()
            ) <= self.num_blocks:
                a, b = self.step_cost.decode_line(n, base)
                if self.noise is None:
                    self._segment_host_s = 0.0
                    self.segment = seg = self._plain_segment
                    seg.restart(now, a, b, n, k)
                else:
                    self.segment = NoisyDecodeSegment(now, a, b, n, k, self.noise, self.step)
                    return self.segment.end_s(k)
                return now + k * a + b * (k * (k + 1) // 2)
        if self.partial is None and self.noise is None and self.waiting:
            return self._admit(now)
        return schedule(self, now)

    def _admit(self, now: float) -> float | None:
        """fast_steps.schedule's step where nobody is part-way through a prompt and the KV pool's upper bound
        clears it (no block counted, nobody preempted), without step noise, and fast_steps.fold's segment
        headed by it when it leaves nobody waiting: in one pass (the step after an arrival's cut, once per
        request). The same decisions and floating-point operations as schedule and fold; schedule where the
        bound does not clear."""
        decoders, waiting = self.decoders, self.waiting
        s = self.step
        s1, bs, n = s + 1, self.block_size, len(decoders)
        sum_offset = self.sum_offset
        context = sum_offset + n * s1  # the KV tokens the step reads
        if (context + self.held_slack) // bs > self.num_blocks:
            return schedule(self, now)
        budget = self.budget - n
        tokens = running = n
        max_running, max_len = self.max_running, self.max_model_len
        # the requests it admits, in order: a waiting request has nothing computed (new, or preempted to be
        # recomputed), so each gets its whole prompt and output so far (prompt + out tokens) but the last, which
        # may get the budget's rest (num_new)
        admitted: list[Req] = []
        whole = True  # every one admitted gets its whole prompt and its first token, and goes on decoding
        orders = self._orders
        num_new = 0
        while waiting and budget > 0 and running < max_running:
            r = waiting.popleft()
            known = r.prompt + r.out
            if known <= budget:
                num_new = known
                if r.max_out - r.out <= 1 or max_len - known <= 1:
                    whole = False
            else:
                num_new = budget
                whole = False
            orders += 1
            r.order = orders  # running order (a recompute joins at the end again)
            admitted.append(r)
            budget -= num_new
            tokens += num_new
            context += num_new
            running += 1
        self._orders = orders
        if not running:
            self.busy = False
            return None
        # the device time and eager_steps.py's host time before the step: StepCost.step_s, inlined (the same
        # floating-point operations)
        terms = self._step_shapes.get((tokens, running))
        if terms is None:
            duration, host = self.step_cost.step_s(tokens, running, context)
        else:
            dense, t2, kv_bytes, bandwidth, mixed, eager, extra, host = terms
            predicted = dense + t2 * (1e3 * context * kv_bytes / bandwidth) + mixed
            predicted = (0.0 if predicted < 0.0 else predicted) * 1e-3  # noqa: FURB136 - max() is a slow call
            if predicted > 0.0:  # EagerStepModel.predict's sum (x + 0.0 is x: no eager term)
                predicted = predicted + eager
            duration = predicted + extra
        device = duration
        duration += host
        heap = self.finishing
        if whole and not waiting:  # fold's segment: unless a decoder finishes with this step
            first = heap[0][0] if heap and self._stale_free else first_finish(self)
            if first > s1 or first < 0:
                for r in admitted:  # each one's whole prompt and output so far, and its first token
                    known = r.computed = r.prompt + r.out
                    out = r.out = r.out + 1
                    known += 1
                    r.offset = offset = known - 1 - s1
                    left = r.max_out - out
                    if max_len - known < left:  # noqa: PLR1730 - min() is a slow call in CPython 3.11
                        left = max_len - known
                    r.end_step = end = s1 + left
                    decoders[r.order] = r
                    sum_offset += offset
                    heappush(heap, (end, r.order))
                n2 = len(decoders)
                k = heap[0][0] - s
                base = sum_offset + n2 * s
                if (base + n2 * (k + bs - 1)) // bs <= self.num_blocks:
                    self.sum_offset = sum_offset
                    line = self._decode_lines.get(n2)  # step_cost.decode_line(n2, base), inlined
                    if line is None:
                        a, b = self.step_cost.decode_line(n2, base)
                    else:
                        a, b = line[0] + line[1] * base, line[2]
                    self._segment_host_s = host
                    # _plain_segment.restart(now, a, b, n2, k, duration, n, first_tokens), inlined
                    self.segment = seg = self._plain_segment
                    seg.start_s = now
                    seg.a = a
                    seg.b = b
                    seg.n = n2
                    seg.total = k
                    seg.delivered = 0
                    seg.first_tokens = admitted
                    seg.origin_s = origin = now + duration - a - b
                    seg.head_end_s = origin + a + b  # end_s(1)
                    seg.head_gaps = n
                    seg.head_tokens = n + len(admitted)
                    return origin + k * a + b * (k * (k + 1) // 2)  # seg.end_s(k), inlined
                # the exact test near capacity: undo, and take the step alone (their heap entries stay: stale)
                self._stale_free = False
                for r in admitted:
                    del decoders[r.order]
                    r.out -= 1
                    r.computed = 0
        # the step alone, as schedule leaves it: its chunks (the last one's num_new)
        scheduled = [(r, r.prompt + r.out) for r in admitted]
        if scheduled:
            scheduled[-1] = (admitted[-1], num_new)
        self._scheduled, self._scheduled_decoders = scheduled, n
        self.busy_s += device
        return now + duration

    def next_step(self, now: float) -> float | None:
        """The step or decode segment in flight ends at now (its tokens, its finishes), and the next starts:
        returns when it ends (start_step)."""
        seg = self.segment
        if seg is None:
            end_step(self, now)
            return self.start_step(now)
        total = seg.total
        self.last_seen = seen = seg.deliver(total, self.frontend, self.recorder, self.last_seen, now)
        self.step = s = self.step + total
        heap = self.finishing
        if self.noise is not None:
            self.segment = None
            self.busy_s += seg.device_s(total)
            if heap[0][0] <= s:
                finish_decoders(self, seen)
            return self.start_step(now)
        self.busy_s += now - seg.start_s - self._segment_host_s
        decoders = self.decoders
        if heap[0][0] <= s:  # the decoders whose last token came with step s leave
            if self._stale_free:  # finish_decoders(self, seen), inlined (a segment ends at every finish)
                rec = self.recorder
                while heap and heap[0][0] <= s:
                    r = decoders.pop(heappop(heap)[1])
                    offset, sent, prompt = r.offset, r.sent, r.prompt
                    self.sum_offset -= offset
                    rec.arrival_s.append(sent)
                    rec.ttft_s.append(r.first_seen - sent)
                    rec.e2e_s.append(seen - sent)
                    rec.output_tokens.append(offset + s + 1 - prompt)
                    rec.prompt_tokens.append(prompt)
                    self._on_finish(self.index)
                if seen > rec.last_completion_s:  # noqa: PLR1730 - max() is a slow call in CPython 3.11
                    rec.last_completion_s = seen
            else:
                finish_decoders(self, seen)
        if decoders and not self.waiting and self.partial is None:
            # start_step's segment up to the next finish, inlined (one starts after every finish): the same
            # segment object restarted (seg.restart(now, a, b, n, k), inlined)
            end = heap[0][0] if self._stale_free else first_finish(self)
            n, bs = len(decoders), self.block_size
            k = end - s
            base = self.sum_offset + n * s
            if (base + n * (k + bs - 1)) // bs <= self.num_blocks or sum(
                -(-(r.offset + end) // bs) for r in decoders.values()
            ) <= self.num_blocks:
                line = self._decode_lines.get(n)  # step_cost.decode_line(n, base), inlined
                if line is None:
                    a, b = self.step_cost.decode_line(n, base)
                else:
                    a, b = line[0] + line[1] * base, line[2]
                self._segment_host_s = 0.0
                seg.start_s = seg.origin_s = now
                seg.a = a
                seg.b = b
                seg.n = n
                seg.total = k
                seg.delivered = 0
                seg.first_tokens = None
                return now + k * a + b * (k * (k + 1) // 2)
        self.segment = None
        if self.partial is None and self.waiting:
            return self._admit(now)
        return schedule(self, now)
