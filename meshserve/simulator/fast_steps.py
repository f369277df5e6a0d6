"""The fast replica's steps one at a time (fast_replica.py), where its one-pass paths do not apply.

Scheduler.schedule's decisions on the replica's counters, sequence by sequence: a prompt part-way through its
prefill, KV blocks near capacity (the newest running sequence preempted, to be recomputed), step noise, a step
that a decoder finishes with. FastReplica's decode segments and its admitting step (_admit) make the same
decisions in closed form for the common case and come here for the rest; these functions read and write the
replica's state as its methods would.
"""

from __future__ import annotations

from heapq import heappop, heappush
from typing import TYPE_CHECKING

from meshserve.simulator.decode_segment import NoisyDecodeSegment

if TYPE_CHECKING:
    from meshserve.simulator.fast_replica import FastReplica, Req


def schedule(rep: FastReplica, now: float) -> float | None:
    """One step as Scheduler.schedule decides it: every running sequence first (a decode token each, the
    prefilling one the rest of its prompt within the budget), preempting the newest when blocks run out;
    then waiting ones in order while budget, sequence slots and blocks last."""
    decoders, waiting = rep.decoders, rep.waiting
    s1, bs, n = rep.step + 1, rep.block_size, len(decoders)
    queued = len(waiting)  # requests waiting when the step is decided: the host gap's table
    held_bound = rep.sum_offset + n * s1 + rep.held_slack
    budget = rep.budget - n
    if rep.partial is not None:
        held_bound += rep.partial.computed
    free = None if held_bound // bs <= rep.num_blocks else free_blocks_after_decodes(rep)
    preempted = False
    if free is not None and free < 0:
        free, preempted = preempt_for_decodes(rep, free)
        n = len(decoders)
    tokens, context = n, rep.sum_offset + n * s1  # the step's tokens and the KV tokens it reads
    scheduled: list[tuple[Req, int]] = []
    p = rep.partial
    if p is not None and budget > 0:
        num_new = min(p.prompt + p.out - p.computed, budget)
        need = -(-(p.computed + num_new) // bs) - -(-p.computed // bs)
        if free is not None and need > free:  # the newest running sequence: it is its own victim
            free, _ = preempt_newest(rep, free)
            preempted = True
        else:
            if free is not None:
                free -= need
            scheduled.append((p, num_new))
            budget -= num_new
            tokens += num_new
            context += p.computed + num_new
            rep.partial = None
    running, max_running = n + len(scheduled), rep.max_running
    while waiting and not preempted and budget > 0 and running < max_running:
        r = waiting[0]
        num_new = r.prompt + r.out
        if num_new > budget:  # noqa: PLR1730 - min() is a slow call in CPython 3.11
            num_new = budget
        if free is not None:
            need = -(-num_new // bs)
            if need > free:
                break
            free -= need
        waiting.popleft()
        rep._orders = r.order = rep._orders + 1  # running order (a recompute joins at the end again)
        scheduled.append((r, num_new))
        budget -= num_new
        tokens += num_new
        context += r.computed + num_new
        running += 1
    if not running:
        rep.busy = False
        return None
    # the device time and eager_steps.py's host time before the step
    duration, host = rep.step_cost.step_s(tokens, running, context)
    device = duration
    if rep.noise is not None:
        duration, device = rep.noise.apply(rep.step, device, tokens > running, queued)
    duration += host
    if free is None and not waiting:
        end = fold(rep, now, duration, scheduled, n, device, host)
        if end is not None:
            return end
    rep._scheduled, rep._scheduled_decoders = scheduled, n
    rep.busy_s += device
    return now + duration


def fold(rep: FastReplica, now: float, duration: float, scheduled: list[tuple[Req, int]], n: int, device: float,
    host: float = 0.0,
) -> float | None:
    """When the step just scheduled leaves nobody waiting or part-way and nobody finishing with it, the decode
    steps after it are fixed at once: apply it now and start a segment headed by it (one event for both).
    None (nothing changed) otherwise."""
    heap, decoders = rep.finishing, rep.decoders
    s = rep.step
    s1 = s + 1
    first = heap[0][0] if heap and rep._stale_free else first_finish(rep)
    if first <= s1 and first >= 0:
        return None  # a decoder finishes with this step: its end is an event
    max_len = rep.max_model_len
    for r, num_new in scheduled:
        known = r.prompt + r.out
        if r.computed + num_new < known or r.max_out - r.out <= 1 or max_len - known <= 1:
            return None  # part-way through its prompt, or done with its first token
    first_tokens = []
    sum_offset = rep.sum_offset
    for r, num_new in scheduled:
        r.computed += num_new
        out = r.out = r.out + 1
        known = r.prompt + out
        r.offset = offset = known - 1 - s1
        left = r.max_out - out
        if max_len - known < left:  # noqa: PLR1730 - min() is a slow call in CPython 3.11
            left = max_len - known
        r.end_step = end = s1 + left
        decoders[r.order] = r
        sum_offset += offset
        heappush(heap, (end, r.order))
        first_tokens.append(r)
    n2, bs = len(decoders), rep.block_size
    k = heap[0][0] - s
    base = sum_offset + n2 * s
    if (base + n2 * (k + bs - 1)) // bs > rep.num_blocks:
        # the exact test near capacity: undo, and take the step alone (their heap entries stay: stale)
        rep._stale_free = False
        for r, num_new in scheduled:
            del decoders[r.order]
            r.out -= 1
            r.computed -= num_new
        return None
    rep.sum_offset = sum_offset
    line = rep._decode_lines.get(n2)  # step_cost.decode_line(n2, base), inlined
    if line is None:
        a, b = rep.step_cost.decode_line(n2, base)
    else:
        a, b = line[0] + line[1] * base, line[2]
    rep._segment_host_s = host
    if rep.noise is None:  # (the rare path: FastReplica._admit inlines the same restart on the common one)
        rep.segment = seg = rep._plain_segment
        seg.restart(now, a, b, n2, k, duration, n, first_tokens)
        return seg.end_s(k)  # k >= 2: the closed form
    rep.segment = seg = NoisyDecodeSegment(
        now, a, b, n2, k, rep.noise, rep.step, duration, device, n, first_tokens
    )
    return seg.end_s(k)


def first_finish(rep: FastReplica) -> int:
    """The step whose token ends the first decoder to finish (the finishing heap's top once the entries of
    decoders preempted since are dropped); -1 when no decoder is left."""
    heap, decoders = rep.finishing, rep.decoders
    while heap:
        end, order = heap[0]
        r = decoders.get(order)
        if r is not None and r.end_step == end:
            return end
        heappop(heap)
    return -1


def free_blocks_after_decodes(rep: FastReplica) -> int:
    """Free blocks once every decoder holds room for this step's token (negative: they do not fit)."""
    s1, bs = rep.step + 1, rep.block_size
    held = sum(-(-(r.offset + s1) // bs) for r in rep.decoders.values())
    if rep.partial is not None:
        held += -(-rep.partial.computed // bs)
    return rep.num_blocks - held


def preempt_for_decodes(rep: FastReplica, free: int) -> tuple[int, bool]:
    """Blocks ran out for this step's decode tokens: preempt from the newest running sequence (the partial
    first) until the rest fit. The scheduler does it sequence by sequence in batch order; as every decoder
    needs at most one block and victims come off the end, the survivors are the same."""
    while free < 0 and (rep.partial is not None or rep.decoders):
        free, _ = preempt_newest(rep, free)
    return free, True


def preempt_newest(rep: FastReplica, free: int) -> tuple[int, Req]:
    """Preempt the newest running sequence (recompute: its blocks go back, its tokens stay); returns the free
    blocks after it, counting that it no longer needs this step's block."""
    bs, s1 = rep.block_size, rep.step + 1
    p = rep.partial
    if p is not None:
        rep.partial = None
        free += -(-p.computed // bs)
        victim = p
    else:
        order = next(reversed(rep.decoders))
        victim = rep.decoders.pop(order)
        rep._stale_free = False  # its entry in finishing stays
        rep.sum_offset -= victim.offset
        free += -(
            -(victim.offset + s1) // bs
        )  # what it held plus the block this step would have given it
        victim.out = victim.offset + rep.step + 1 - victim.prompt
        victim.last_seen = rep.last_seen
    victim.computed = 0
    rep.waiting.appendleft(victim)
    rep.num_preemptions += 1
    rep.recorder.num_preemptions += 1
    return free, victim


def end_step(rep: FastReplica, now: float) -> None:
    """The explicit step in flight (not a segment) ends at now: its tokens, its finishes."""
    rep.step += 1
    scheduled, n = rep._scheduled, rep._scheduled_decoders
    rep._scheduled = []
    sampled = n
    for r, num_new in scheduled:
        r.computed += num_new
        if r.computed >= r.prompt + r.out:
            sampled += 1
    fe, rec = rep.frontend, rep.recorder
    # fe.deliver(now, sampled) of the fast replica's one API process (no gate, no folding)
    seen = now if fe is None or not sampled else fe.submit(now, sampled * fe.costs.per_token_s)
    if n:
        rec.add_itl_count(seen - rep.last_seen, n)
    if sampled:
        rep.last_seen = seen
    s, max_len = rep.step, rep.max_model_len
    for r, _ in scheduled:
        known = r.prompt + r.out
        if r.computed < known:
            rep.partial = r  # its prefill goes on next step
            continue
        r.out += 1
        known += 1
        if r.first_seen < 0.0:
            r.first_seen = seen
        else:  # recomputed after a preemption: the gap since its last token
            rec.add_itl(seen - r.last_seen)
        left = min(r.max_out - r.out, max_len - known)
        if left <= 0:
            finish(rep, r, seen, r.out)
            continue
        r.offset = known - 1 - s
        r.end_step = s + left
        rep.decoders[r.order] = r
        rep.sum_offset += r.offset
        heappush(rep.finishing, (r.end_step, r.order))
    finish_decoders(rep, seen)


def finish_decoders(rep: FastReplica, seen: float) -> None:
    """Decoders whose last token came with step S leave (their client time: seen). RunRecorder.finish's
    appends, without its call (one per request)."""
    heap, decoders, s = rep.finishing, rep.decoders, rep.step
    rec, on_finish, index = rep.recorder, rep._on_finish, rep.index
    stale_free = rep._stale_free
    finished = False
    while heap and heap[0][0] <= s:
        end, order = heappop(heap)
        if stale_free:
            r = decoders.pop(order)
        else:
            got = decoders.get(order)
            if got is None or got.end_step != end:
                continue  # preempted since
            r = got
            del decoders[order]
        offset, sent, prompt = r.offset, r.sent, r.prompt
        rep.sum_offset -= offset
        rec.arrival_s.append(sent)
        rec.ttft_s.append(r.first_seen - sent)
        rec.e2e_s.append(seen - sent)
        rec.output_tokens.append(offset + s + 1 - prompt)
        rec.prompt_tokens.append(prompt)
        on_finish(index)
        finished = True
    if finished and seen > rec.last_completion_s:  # (max() is a slow call in CPython 3.11)
        rec.last_completion_s = seen


def finish(rep: FastReplica, r: Req, seen: float, out: int) -> None:
    rep.recorder.finish(r.sent, r.first_seen, seen, out, r.prompt)
    rep._on_finish(rep.index)
