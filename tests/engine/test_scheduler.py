"""Scheduler: token budget, chunked prefill, ordering, preemption/recompute, rejection, stops, prefix hits."""

from __future__ import annotations

import collections
import random

import pytest

from meshserve.config import CacheConfig, SchedulerConfig
from meshserve.engine.scheduler import Scheduler
from meshserve.engine.scheduler_output import SchedulerOutput
from meshserve.engine.sequence import Sequence, SequenceStatus
from meshserve.errors import PromptTooLongError
from meshserve.sampling import SamplingParams

BS = 4


def make_sched(num_blocks: int = 64, prefix: bool = True, **sched) -> Scheduler:
    sched.setdefault("max_model_len", 256)
    return Scheduler(SchedulerConfig(**sched),
                     CacheConfig(block_size=BS, num_blocks=num_blocks, enable_prefix_caching=prefix))


def make_seq(seq_id: str, prompt, max_tokens: int = 4, stop_ids=(), **params) -> Sequence:
    p = SamplingParams(max_tokens=max_tokens, **params)
    p._all_stop_token_ids = set(p.stop_token_ids) | set(stop_ids)
    return Sequence(seq_id=seq_id, request_id=seq_id, index=0, prompt_token_ids=list(prompt), params=p,
                    max_tokens=max_tokens)


def token_for(seq: Sequence) -> int:
    """A deterministic 'model': the next token depends only on the sequence and its position."""
    return 1000 + (sum(ord(c) for c in seq.seq_id) * 31 + seq.num_output_tokens * 7) % 997


def step(s: Scheduler, sampled: dict[str, int] | None = None, check: bool = True) -> SchedulerOutput:
    """One engine step: schedule, (check the decision), then feed back one token per sampling entry."""
    out = s.schedule()
    if check:
        check_invariants(s, out)
    if sampled is None:
        sampled = {e.seq_id: token_for(s.seqs[e.seq_id]) for e in out.scheduled if e.do_sample}
    else:
        sampled = {e.seq_id: sampled[e.seq_id] for e in out.scheduled if e.do_sample and e.seq_id in sampled}
    s.update_after_step(out, sampled)
    return out


def chunks(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(e.seq_id, e.num_new_tokens) for e in out.scheduled]


def check_invariants(s: Scheduler, out: SchedulerOutput) -> None:
    bm = s.block_manager
    assert out.num_batched_tokens <= s.config.max_num_batched_tokens
    assert len(out.scheduled) <= s.config.max_num_seqs
    assert len(s.running) <= s.max_running
    ids = [e.seq_id for e in out.scheduled]
    assert len(ids) == len(set(ids))
    assert not set(ids) & set(out.preempted_seq_ids)
    for e in out.scheduled:
        seq = s.seqs[e.seq_id]
        assert e.num_new_tokens >= 1
        assert e.token_ids == seq.all_token_ids[e.num_computed_tokens:e.num_computed_tokens + e.num_new_tokens]
        # the table covers every token of this chunk
        assert len(e.block_table) >= bm.blocks_needed(e.num_computed_tokens + e.num_new_tokens)
        # (known tokens: pipelined steps count a sampling entry's token as pending once it is scheduled)
        assert e.do_sample == (e.num_computed_tokens + e.num_new_tokens == seq.num_known_tokens)
        # a block that carries a hash in seq's table holds exactly that part of seq
        for i, blk in enumerate(bm.seq_blocks[e.seq_id]):
            if blk.block_hash is not None:
                assert i < len(seq.block_hashes) and blk.block_hash == seq.block_hashes[i]
    # ref counts match the tables; free blocks are exactly the unreferenced ones
    counts = [0] * bm.num_blocks
    for blocks in bm.seq_blocks.values():
        for blk in blocks:
            counts[blk.block_id] += 1
    assert [blk.ref_count for blk in bm.pool.blocks] == counts
    assert set(bm.pool.free_queue) == {i for i, c in enumerate(counts) if c == 0}
    for seq in s.waiting:
        assert seq.seq_id not in bm.seq_blocks and seq.num_computed_tokens == 0


# -- budget, chunked prefill, ordering --------------------------------------------------------------

def test_chunked_prefill_splits_long_prompt_within_budget():
    s = make_sched(max_num_batched_tokens=8)
    a = make_seq("a", range(20), max_tokens=3)
    s.add(a)
    o1 = step(s)
    assert chunks(o1) == [("a", 8)]
    e = o1.scheduled[0]
    assert e.num_computed_tokens == 0 and e.token_ids == list(range(8)) and not e.do_sample
    assert a.num_computed_tokens == 8 and a.output_token_ids == []
    assert len(e.block_table) == 2
    o2 = step(s)
    assert chunks(o2) == [("a", 8)]
    assert o2.scheduled[0].num_computed_tokens == 8 and o2.scheduled[0].token_ids == list(range(8, 16))
    assert not o2.scheduled[0].do_sample
    o3 = step(s)
    assert chunks(o3) == [("a", 4)]
    assert o3.scheduled[0].do_sample and o3.scheduled[0].token_ids == list(range(16, 20))
    assert len(o3.scheduled[0].block_table) == 5
    assert a.num_computed_tokens == 20 and a.num_output_tokens == 1
    o4 = step(s)
    assert chunks(o4) == [("a", 1)] and o4.scheduled[0].num_computed_tokens == 20
    assert o4.scheduled[0].token_ids == [a.output_token_ids[0]]


def test_budget_shared_between_running_and_new_prefill():
    s = make_sched(max_num_batched_tokens=8)
    a = make_seq("a", range(20), max_tokens=3)
    b = make_seq("b", range(100, 106), max_tokens=3)
    s.add(a)
    s.add(b)
    assert chunks(step(s)) == [("a", 8)]
    assert chunks(step(s)) == [("a", 8)]
    out = step(s)
    assert chunks(out) == [("a", 4), ("b", 4)]  # b's prefill chunked into the leftover budget
    assert out.num_batched_tokens == 8
    assert not out.scheduled[1].do_sample
    out = step(s)
    assert chunks(out) == [("a", 1), ("b", 2)]  # a's decode first, then b's remaining prompt
    assert out.scheduled[1].do_sample


def test_token_budget_never_exceeded_over_many_steps():
    rng = random.Random(0)
    s = make_sched(num_blocks=200, max_num_batched_tokens=7, max_num_seqs=5)
    for i in range(12):
        s.add(make_seq(f"r{i}", [rng.randrange(50) for _ in range(rng.randrange(1, 30))],
                       max_tokens=rng.randrange(1, 6)))
    steps = 0
    while s.has_unfinished():
        out = step(s)
        assert out.num_batched_tokens <= 7
        steps += 1
        assert steps < 500
    assert s.block_manager.num_free_blocks == 200


def test_decodes_scheduled_before_new_prefills():
    s = make_sched(max_num_batched_tokens=16)
    a = make_seq("a", range(4), max_tokens=5)
    s.add(a)
    step(s)
    b = make_seq("b", range(10, 30), max_tokens=2)
    s.add(b)
    out = step(s)
    assert chunks(out) == [("a", 1), ("b", 15)]
    assert out.scheduled[0].do_sample and not out.scheduled[1].do_sample


def test_running_sequences_keep_arrival_order():
    s = make_sched(max_num_batched_tokens=64)
    seqs = [make_seq(f"s{i}", range(i, i + 5), max_tokens=4) for i in range(4)]
    for q in seqs:
        s.add(q)
    assert [e.seq_id for e in step(s).scheduled] == ["s0", "s1", "s2", "s3"]
    assert [e.seq_id for e in step(s).scheduled] == ["s0", "s1", "s2", "s3"]
    assert [q.seq_id for q in s.running] == ["s0", "s1", "s2", "s3"]


def test_max_num_seqs_respected():
    s = make_sched(max_num_seqs=2, max_num_batched_tokens=64)
    a, b, c = (make_seq(n, range(3), max_tokens=2) for n in "abc")
    for q in (a, b, c):
        s.add(q)
    out = step(s)
    assert [e.seq_id for e in out.scheduled] == ["a", "b"]
    assert s.num_running == 2 and list(s.waiting) == [c] and c.status == SequenceStatus.WAITING
    out = step(s)  # a and b hit max_tokens here
    assert [e.seq_id for e in out.scheduled] == ["a", "b"]
    assert a.is_finished and b.is_finished
    out = step(s)
    assert [e.seq_id for e in out.scheduled] == ["c"]
    assert sorted(out.finished_seq_ids) == ["a", "b"]


def test_waiting_is_fifo():
    """A later, shorter prompt never jumps ahead of the queue head, even when it would fit."""
    s = make_sched(max_num_batched_tokens=10, enable_chunked_prefill=False, prefix=False)
    x = make_seq("x", range(5), max_tokens=2)
    y = make_seq("y", range(10, 17), max_tokens=2)
    z = make_seq("z", range(20, 22), max_tokens=2)
    for q in (x, y, z):
        s.add(q)
    out = step(s)
    assert chunks(out) == [("x", 5)]  # y (7) does not fit the 5 left; z (2) would, but waits behind y
    assert list(s.waiting) == [y, z]
    out = step(s)
    assert chunks(out) == [("x", 1), ("y", 7), ("z", 2)]  # 1 + 7 = 8: z (2) fits the last 2
    assert x.is_finished and not s.waiting
    assert [q.seq_id for q in s.running] == ["y", "z"]


def test_waiting_fifo_with_chunking():
    s = make_sched(max_num_batched_tokens=10, prefix=False)
    for n, ln in (("x", 6), ("y", 6), ("z", 6)):
        s.add(make_seq(n, range(ln), max_tokens=2))
    out = step(s)
    assert chunks(out) == [("x", 6), ("y", 4)]
    assert [q.seq_id for q in s.waiting] == ["z"]
    out = step(s)
    # x decodes, y finishes its prompt, z gets what is left
    assert chunks(out) == [("x", 1), ("y", 2), ("z", 6)]


def test_no_chunked_prefill_prompt_waits_whole():
    s = make_sched(max_num_batched_tokens=10, enable_chunked_prefill=False, prefix=False)
    a = make_seq("a", range(4), max_tokens=3)
    s.add(a)
    step(s)  # a running, decoding
    b = make_seq("b", range(20, 30), max_tokens=1)  # exactly the whole budget
    c = make_seq("c", range(40, 42), max_tokens=1)  # would fit, but FIFO keeps it behind b
    s.add(b)
    s.add(c)
    out = step(s)
    assert chunks(out) == [("a", 1)]
    assert list(s.waiting) == [b, c] and b.num_computed_tokens == 0
    assert s.block_manager.block_table(b) == []
    out = step(s)  # a finishes at this step (3 outputs)
    assert chunks(out) == [("a", 1)] and a.is_finished
    out = step(s)
    assert chunks(out) == [("b", 10)]  # whole prompt, never split
    assert out.scheduled[0].do_sample
    assert list(s.waiting) == [c]  # b + c = 12 > 10: c waits whole as well
    assert chunks(step(s)) == [("c", 2)]


def test_no_chunked_prefill_rejects_prompt_over_budget():
    s = make_sched(max_num_batched_tokens=10, enable_chunked_prefill=False)
    with pytest.raises(PromptTooLongError):
        s.check_fits(11, 1)
    s.check_fits(10, 1)
    make_sched(max_num_batched_tokens=10).check_fits(11, 1)  # fine with chunking


# -- preemption -------------------------------------------------------------------------------------

def test_preemption_of_most_recent_and_recompute():
    s = make_sched(num_blocks=4, prefix=False, max_num_batched_tokens=64)
    a = make_seq("a", range(4), max_tokens=8)
    b = make_seq("b", range(10, 14), max_tokens=8)
    s.add(a)
    s.add(b)
    # each grows to 8 tokens = 2 blocks: the pool is full
    for _ in range(5):
        out = step(s)
        assert chunks(out)[0][0] == "a" and not out.preempted_seq_ids
    assert a.num_tokens == b.num_tokens == 9 and s.block_manager.num_free_blocks == 0
    b_outputs = list(b.output_token_ids)

    out = step(s)  # a needs a 3rd block: b (the most recently admitted) is preempted
    assert out.preempted_seq_ids == ["b"]
    assert chunks(out) == [("a", 1)]
    assert b.status == SequenceStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1 and s.num_preemptions == 1
    assert s.block_manager.block_table(b) == []
    assert s.waiting[0] is b and s.running == [a]
    assert b.output_token_ids == b_outputs  # tokens kept
    assert s.block_manager.num_free_blocks == 1

    # b cannot come back until a finishes (it needs 3 blocks for its 9 tokens)
    while not a.is_finished:
        out = step(s)
        assert [e.seq_id for e in out.scheduled] == ["a"]
        assert b.status == SequenceStatus.PREEMPTED
    assert a.num_output_tokens == 8

    out = step(s)
    assert chunks(out) == [("b", 9)]
    e = out.scheduled[0]
    assert e.num_computed_tokens == 0
    assert e.token_ids == list(range(10, 14)) + b_outputs  # recompute of prompt + generated tokens
    assert e.do_sample
    assert b.status == SequenceStatus.RUNNING
    assert b.num_output_tokens == 6
    assert out.finished_seq_ids == ["a"]
    while s.has_unfinished():
        step(s)
    assert b.output_token_ids[:5] == b_outputs and b.num_output_tokens == 8
    assert b.status == SequenceStatus.FINISHED_LENGTH


def test_preempted_sequence_goes_to_front_of_waiting():
    s = make_sched(num_blocks=4, prefix=False, max_num_batched_tokens=64)
    a = make_seq("a", range(4), max_tokens=8)
    b = make_seq("b", range(10, 14), max_tokens=8)
    s.add(a)
    s.add(b)
    for _ in range(5):
        step(s)
    c = make_seq("c", range(20, 22), max_tokens=1)
    s.add(c)  # waits: no blocks
    out = step(s)
    assert out.preempted_seq_ids == ["b"]
    assert "c" not in [e.seq_id for e in out.scheduled]  # no admissions in a step that preempted
    assert list(s.waiting) == [b, c]


def test_self_preemption_when_alone():
    """A lone running sequence that cannot grow is preempted itself and later recomputed."""
    s = make_sched(num_blocks=3, prefix=False, max_num_batched_tokens=64)
    a = make_seq("a", range(4), max_tokens=8)  # 12 tokens: fits the 3 blocks exactly
    b = make_seq("b", range(10, 14), max_tokens=1)
    s.add(a)
    s.add(b)
    step(s)  # both admitted; b finishes right away
    assert b.is_finished
    while s.has_unfinished():
        step(s)
    assert a.num_output_tokens == 8 and a.status == SequenceStatus.FINISHED_LENGTH


def test_no_admission_in_a_step_that_preempted():
    """A partially prefilled sequence that preempts itself is not readmitted (recomputed) in the same step."""
    s = make_sched(num_blocks=5, prefix=False, max_num_batched_tokens=8)
    y = make_seq("y", range(3), max_tokens=10)
    x = make_seq("x", range(100, 116), max_tokens=2)
    s.add(y)
    s.add(x)
    assert chunks(step(s)) == [("y", 3), ("x", 5)]
    assert chunks(step(s)) == [("y", 1), ("x", 7)]
    assert s.block_manager.num_free_blocks == 1
    out = step(s)  # y takes the last block; x's next chunk needs one more: x preempts itself
    assert out.preempted_seq_ids == ["x"]
    assert chunks(out) == [("y", 1)]
    assert list(s.waiting) == [x] and x.status == SequenceStatus.PREEMPTED
    assert s.block_manager.num_free_blocks == 3
    out = step(s)  # now x is recomputed from its first token
    assert chunks(out) == [("y", 1), ("x", 7)]
    assert out.scheduled[1].num_computed_tokens == 0


@pytest.mark.parametrize("prefix", [False, True])
def test_tiny_pool_everything_finishes_with_max_tokens(prefix):
    rng = random.Random(1234)
    s = make_sched(num_blocks=10, prefix=prefix, max_num_batched_tokens=12, max_num_seqs=6)
    shared = [rng.randrange(100) for _ in range(8)]
    seqs = []
    for i in range(14):
        tail = [rng.randrange(100) for _ in range(rng.randrange(1, 10))]
        prompt = (shared[:rng.choice([0, 4, 8])] + tail) if prefix else tail
        seq = make_seq(f"q{i}", prompt, max_tokens=rng.randrange(2, 12))
        s.add(seq)
        seqs.append(seq)
    steps = 0
    finished_reported: list[str] = []
    while s.has_unfinished():
        out = step(s)
        finished_reported += out.finished_seq_ids
        steps += 1
        assert steps < 2000
    finished_reported += s.schedule().finished_seq_ids
    assert s.num_preemptions > 0  # the pool really was too small
    for seq in seqs:
        assert seq.status == SequenceStatus.FINISHED_LENGTH
        assert seq.num_output_tokens == seq.max_tokens
        # nothing lost nor duplicated: output i is what the 'model' gives at position i
        expected = []
        probe = Sequence(seq.seq_id, seq.request_id, 0, seq.prompt_token_ids, seq.params, seq.max_tokens)
        for _ in range(seq.max_tokens):
            expected.append(token_for(probe))
            probe.output_token_ids.append(expected[-1])
        assert seq.output_token_ids == expected
    assert sorted(finished_reported) == sorted(q.seq_id for q in seqs)
    assert s.block_manager.num_free_blocks == 10
    assert not s.running and not s.waiting and not s.seqs


# -- rejection --------------------------------------------------------------------------------------

def test_check_fits_max_model_len():
    s = make_sched(num_blocks=64, max_model_len=32)
    s.check_fits(16, 16)  # exactly max_model_len
    with pytest.raises(PromptTooLongError) as ei:
        s.check_fits(20, 13)
    assert "max_model_len" in str(ei.value) and ei.value.param == "max_tokens"
    with pytest.raises(PromptTooLongError):
        s.add(make_seq("long", range(30), max_tokens=3))
    assert not s.waiting and not s.seqs


def test_check_fits_pool_capacity():
    s = make_sched(num_blocks=4, max_model_len=256)  # 16 tokens of KV
    s.check_fits(10, 6)
    with pytest.raises(PromptTooLongError) as ei:
        s.check_fits(10, 7)
    assert "KV cache" in str(ei.value)
    with pytest.raises(PromptTooLongError):
        s.add(make_seq("big", range(10), max_tokens=7))
    assert not s.has_unfinished()


def test_check_fits_counts_a_draft_models_lookahead_slots():
    """A draft model writes num_lookahead_tokens slots past a sequence's tokens every step: a request that
    filled the pool without them preempted itself at its last steps and recomputed, forever (the engine hung)."""
    s = make_sched(num_blocks=4, max_model_len=256)  # 16 tokens of KV
    s.num_lookahead_tokens = 3
    s.check_fits(10, 3)
    with pytest.raises(PromptTooLongError, match="KV cache"):
        s.check_fits(10, 4)


# -- finishing --------------------------------------------------------------------------------------

def test_finish_frees_blocks_and_reports_next_step():
    s = make_sched(num_blocks=8)
    a = make_seq("a", range(10), max_tokens=5)
    b = make_seq("b", range(20, 25), max_tokens=5)
    s.add(a)
    s.add(b)
    step(s)
    assert s.block_manager.num_free_blocks == 8 - 3 - 2
    s.finish(a, SequenceStatus.FINISHED_ABORTED)
    assert a.status == SequenceStatus.FINISHED_ABORTED and a.status.finish_reason == "abort"
    assert a not in s.running and "a" not in s.seqs
    assert s.block_manager.block_table(a) == []
    assert s.block_manager.num_free_blocks == 8 - 2
    s.finish(a, SequenceStatus.FINISHED_STOPPED)  # idempotent
    assert a.status == SequenceStatus.FINISHED_ABORTED
    out = s.schedule()
    assert out.finished_seq_ids == ["a"]
    assert [e.seq_id for e in out.scheduled] == ["b"]
    s.update_after_step(out, {"b": 1, "a": 2})  # a stale id is ignored
    assert a.num_output_tokens == 1
    assert s.schedule().finished_seq_ids == []


def test_finish_waiting_sequence():
    s = make_sched(max_num_seqs=1)
    a = make_seq("a", range(4))
    b = make_seq("b", range(4))
    s.add(a)
    s.add(b)
    step(s)
    s.finish(b, SequenceStatus.FINISHED_ABORTED)
    assert not s.waiting and s.running == [a]
    assert s.schedule().finished_seq_ids == ["b"]


def test_empty_schedule():
    s = make_sched()
    out = s.schedule()
    assert out.is_empty and out.num_batched_tokens == 0 and not out.finished_seq_ids


def test_stop_token_respects_min_tokens():
    s = make_sched()
    a = make_seq("a", range(4), max_tokens=10, min_tokens=2, stop_token_ids=[99], stop_ids=[2])
    s.add(a)
    step(s, {"a": 99})  # 1 output < min_tokens: ignored
    assert a.status == SequenceStatus.RUNNING and a.output_token_ids == [99]
    out = step(s, {"a": 99})
    assert a.status == SequenceStatus.FINISHED_STOPPED and a.stop_reason == 99
    assert a.output_token_ids == [99, 99]
    assert s.running == [] and s.block_manager.num_free_blocks == 64
    assert s.schedule().finished_seq_ids == ["a"]
    assert out.finished_seq_ids == []


def test_eos_stop_has_no_stop_reason():
    s = make_sched()
    a = make_seq("a", range(4), max_tokens=10, stop_ids=[2])  # 2: an EOS merged by the engine
    s.add(a)
    step(s, {"a": 5})
    step(s, {"a": 2})
    assert a.status == SequenceStatus.FINISHED_STOPPED and a.stop_reason is None
    assert a.status.finish_reason == "stop"


def test_stop_token_not_in_set_does_not_stop():
    s = make_sched()
    a = make_seq("a", range(4), max_tokens=3, stop_token_ids=[99])
    a.params._all_stop_token_ids = set()  # e.g. not merged: only _all_stop_token_ids counts
    s.add(a)
    for _ in range(3):
        step(s, {"a": 99})
    assert a.status == SequenceStatus.FINISHED_LENGTH


def test_length_finish_at_max_tokens():
    s = make_sched()
    a = make_seq("a", range(4), max_tokens=3)
    s.add(a)
    step(s)
    step(s)
    assert not a.is_finished
    step(s)
    assert a.status == SequenceStatus.FINISHED_LENGTH and a.status.finish_reason == "length"
    assert a.num_output_tokens == 3
    assert not s.has_unfinished()
    assert s.schedule().finished_seq_ids == ["a"]


def test_chunk_without_sample_does_not_append():
    s = make_sched(max_num_batched_tokens=4)
    a = make_seq("a", range(10))
    s.add(a)
    out = s.schedule()
    assert not out.scheduled[0].do_sample
    assert s.update_after_step(out, {}) == []
    assert a.num_computed_tokens == 4 and a.num_output_tokens == 0


# -- prefix cache through the scheduler -------------------------------------------------------------

def test_prefix_hit_skips_cached_tokens():
    s = make_sched(num_blocks=16)
    a = make_seq("a", range(10), max_tokens=1)
    s.add(a)
    out = step(s)
    a_table = out.scheduled[0].block_table
    assert a.num_cached_tokens == 0 and a.is_finished
    b = make_seq("b", list(range(8)) + [50, 51, 52], max_tokens=2)
    s.add(b)
    out = step(s)
    assert chunks(out) == [("b", 3)]
    e = out.scheduled[0]
    assert e.num_computed_tokens == 8 and e.token_ids == [50, 51, 52] and e.do_sample
    assert e.block_table[:2] == a_table[:2]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 11
    bm = s.block_manager
    assert (bm.stats.queries, bm.stats.hits) == (10 + 11, 8)


def test_prefix_hit_with_chunked_prefill():
    s = make_sched(num_blocks=16, max_num_batched_tokens=4)
    a = make_seq("a", range(12), max_tokens=1)
    s.add(a)
    while s.has_unfinished():
        step(s)
    b = make_seq("b", list(range(8)) + list(range(60, 66)), max_tokens=1)  # 14 tokens, 8 cached
    s.add(b)
    out = step(s)
    assert out.scheduled[0].num_computed_tokens == 8
    assert out.scheduled[0].token_ids == [60, 61, 62, 63] and not out.scheduled[0].do_sample
    out = step(s)
    assert out.scheduled[0].num_computed_tokens == 12 and out.scheduled[0].token_ids == [64, 65]
    assert b.num_cached_tokens == 8


def test_same_step_prompt_sharing():
    """Two sequences with one prompt admitted in the same step: the second reuses the first's blocks."""
    s = make_sched(num_blocks=16, max_num_batched_tokens=64)
    a = make_seq("a#0", range(9), max_tokens=2)
    b = make_seq("a#1", range(9), max_tokens=2)
    s.add(a)
    s.add(b)
    out = step(s)
    assert chunks(out) == [("a#0", 9), ("a#1", 1)]
    assert out.scheduled[1].num_computed_tokens == 8
    assert out.scheduled[0].block_table[:2] == out.scheduled[1].block_table[:2]
    assert b.num_cached_tokens == 8
    assert s.block_manager.num_free_blocks == 16 - 4


def test_prefix_caching_disabled_in_scheduler():
    s = make_sched(num_blocks=16, prefix=False)
    a = make_seq("a", range(10), max_tokens=1)
    s.add(a)
    step(s)
    b = make_seq("b", range(10), max_tokens=1)
    s.add(b)
    out = step(s)
    assert chunks(out) == [("b", 10)] and b.num_cached_tokens == 0
    assert s.block_manager.stats.queries == 0


def test_recompute_after_preemption_keeps_first_num_cached_tokens():
    s = make_sched(num_blocks=4, prefix=True, max_num_batched_tokens=64)
    a = make_seq("a", range(4), max_tokens=8)
    b = make_seq("b", range(10, 14), max_tokens=8)
    s.add(a)
    s.add(b)
    for _ in range(6):
        out = step(s)
    assert out.preempted_seq_ids == ["b"]
    queries = s.block_manager.stats.queries
    while s.has_unfinished():
        out = step(s)
    assert b.num_cached_tokens == 0  # set at the first admission only
    assert s.block_manager.stats.queries == queries  # a recompute is not a new query
    assert b.num_output_tokens == 8


def test_pipelined_steps_split_the_running_batch_evenly():
    """With pipeline parallel (two steps in flight, pending sequences skipped) each step takes at most half
    of the running sequences, so the steps in flight stay even instead of one holding the whole batch."""
    s = make_sched(max_num_seqs=8, max_num_batched_tokens=256)
    s.async_mode = s.skip_pending = True
    s.config.pipeline_depth = 2
    for i in range(8):
        s.add(make_seq(f"s{i}", [1, 2, 3], max_tokens=32))
    first = s.schedule()  # all eight prompts: nothing runs yet, so no share to keep
    assert len(first.scheduled) == 8
    s.update_after_step(first, {e.seq_id: 5 for e in first.scheduled})
    a = s.schedule()
    b = s.schedule()  # launched while a is in flight: the other half
    assert len(a.scheduled) == 4 and len(b.scheduled) == 4
    assert not {e.seq_id for e in a.scheduled} & {e.seq_id for e in b.scheduled}
    assert s.schedule().is_empty  # every sequence waits on a step in flight
    s.update_after_step(a, {e.seq_id: 6 for e in a.scheduled})
    c = s.schedule()
    assert {e.seq_id for e in c.scheduled} == {e.seq_id for e in a.scheduled}


def run_pipelined(s: Scheduler, depth: int) -> tuple[list[SchedulerOutput], int]:
    """The engine's pipelined loop (EngineCore._step_pipelined) over a scheduler: launch a step while fewer than
    depth are in flight, feed back the oldest once the pipeline is full or nothing new could be scheduled.
    Returns the steps launched and the most sequences running at once."""
    s.async_mode = s.skip_pending = True
    s.config.pipeline_depth = depth
    in_flight: collections.deque[SchedulerOutput] = collections.deque()
    steps, peak = [], 0
    for _ in range(10_000):
        if not (s.has_unfinished() or in_flight):
            return steps, peak
        launched = False
        if len(in_flight) < depth:
            out = s.schedule()
            check_invariants(s, out)
            busy = {e.seq_id for o in in_flight for e in o.scheduled}
            assert not busy & {e.seq_id for e in out.scheduled}  # a sequence is in one step at a time
            peak = max(peak, len(s.running))
            if not out.is_empty:
                in_flight.append(out)
                steps.append(out)
                launched = True
        if in_flight and (len(in_flight) == depth or not launched):
            out = in_flight.popleft()
            s.update_after_step(out, {e.seq_id: token_for(s.seqs[e.seq_id]) for e in out.scheduled
                                      if e.do_sample and e.seq_id in s.seqs})
    raise AssertionError("the pipelined loop did not finish")


def _mixed_seqs(n: int) -> list[Sequence]:
    rng = random.Random(5)
    return [make_seq(f"p{i}", [rng.randrange(50) for _ in range(rng.randint(3, 12))],
                     max_tokens=rng.randint(4, 14)) for i in range(n)]


def _one_step_at_a_time(n: int, **kw) -> list[list[int]]:
    s, seqs = make_sched(num_blocks=400, **kw), _mixed_seqs(n)
    for q in seqs:
        s.add(q)
    while s.has_unfinished():
        step(s)
    return [q.output_token_ids for q in seqs]


@pytest.mark.parametrize("depth", [2, 3])
def test_pipelined_steps_each_hold_up_to_max_num_seqs(depth):
    """With pipeline depth d each step in flight is a batch of its own: up to d x max_num_seqs sequences run at
    once, each step holds at most max_num_seqs of them, the full steps hold exactly that many, and every
    sequence gets the tokens it gets one step at a time."""
    kw = {"max_num_seqs": 4, "max_num_batched_tokens": 64}
    seqs = _mixed_seqs(24)
    s = make_sched(num_blocks=400, **kw)
    for q in seqs:
        s.add(q)
    steps, peak = run_pipelined(s, depth)
    assert peak == depth * 4 == s.max_running
    assert max(len(o.scheduled) for o in steps) == 4
    assert sum(len(o.scheduled) == 4 for o in steps) > len(steps) // 2
    assert [q.output_token_ids for q in seqs] == _one_step_at_a_time(24, **kw)


def test_pipelined_steps_preempt_within_one_kv_pool():
    """Three steps in flight over a KV pool too small for all their sequences: a step preempts the newest
    running sequences (some still in a step in flight, whose token is kept and which rejoins once it is
    back), no sequence is in two steps at once, the block invariants hold, and the tokens are unchanged."""
    kw = {"max_num_seqs": 4, "max_num_batched_tokens": 64}
    seqs = _mixed_seqs(16)
    s = make_sched(num_blocks=24, **kw)
    for q in seqs:
        s.add(q)
    run_pipelined(s, 3)
    assert s.num_preemptions > 0
    assert all(len(q.output_token_ids) == q.max_tokens for q in seqs)
    assert s.block_manager.num_free_blocks == 24
    assert [q.output_token_ids for q in seqs] == _one_step_at_a_time(16, **kw)


def test_token_handoff_runs_a_sequence_again_lag_steps_after_its_last():
    """With the token hand-off (lag 2, three steps in flight) a sequence whose token is still in flight runs again
    exactly two steps after the one that sampled it (its input -1, taken on the device), never with two tokens
    pending; each step holds half the running sequences; every sequence gets one-step-at-a-time tokens."""
    s = make_sched(num_blocks=400, max_num_seqs=8, max_num_batched_tokens=64)
    s.async_mode = s.skip_pending = True
    s.config.pipeline_depth, s.handoff_lag = 3, 2
    seqs = _mixed_seqs(8)
    for q in seqs:
        s.add(q)
    in_flight: collections.deque[SchedulerOutput] = collections.deque()
    sampled_at: dict[str, int] = {}
    steps, handed = [], 0
    for _ in range(1000):
        if not (s.has_unfinished() or in_flight):
            break
        launched = False
        if len(in_flight) < 3:
            out = s.schedule()
            for e in out.scheduled:
                if -1 in e.token_ids:
                    handed += 1
                    assert e.token_ids == [-1] and sampled_at[e.seq_id] == len(steps) - 2
                    assert s.seqs[e.seq_id].num_pending_tokens == 2  # its own, and this step's
            if not out.is_empty:
                sampled_at.update((e.seq_id, len(steps)) for e in out.scheduled if e.do_sample)
                in_flight.append(out)
                steps.append(out)
                launched = True
        if in_flight and (len(in_flight) == 3 or not launched):
            out = in_flight.popleft()
            s.update_after_step(out, {e.seq_id: token_for(s.seqs[e.seq_id]) for e in out.scheduled
                                      if e.do_sample and e.seq_id in s.seqs})
    assert not s.has_unfinished()
    assert handed > len(steps)  # most steps carried sequences whose token was in flight
    assert max(len(o.scheduled) for o in steps[1:]) == 4  # half of eight
    assert [q.output_token_ids for q in seqs] == _one_step_at_a_time(8, max_num_seqs=8, max_num_batched_tokens=64)


def test_the_scheduled_rows_fields_are_in_the_order_entry_passes_them():
    """Scheduler._entry builds ScheduledSequence positionally (half the cost of keywords, once per row and
    step): a field moved or added before num_unverified_tokens must move there too."""
    import dataclasses

    from meshserve.engine.scheduler_output import ScheduledSequence

    assert [f.name for f in dataclasses.fields(ScheduledSequence)][:12] == [
        "seq_id", "token_ids", "num_computed_tokens", "block_table", "params", "do_sample", "prompt_token_ids",
        "output_token_ids", "num_prompt_tokens", "num_output_tokens", "num_spec_tokens", "num_unverified_tokens"]


def test_each_step_carries_its_shape_as_the_engine_would_compute_it():
    """SchedulerOutput.shape (the scheduler's, for its TPOT credit) is what StepShape.of gives for the step's
    rows, the engine's step-time model reads it instead of a second pass; async scheduling's updates to the
    sequences after the step is built leave it true, prefill chunks and decodes alike."""
    from meshserve.engine.step_time import StepShape

    s = make_sched(max_num_seqs=4, max_num_batched_tokens=16)
    s.async_mode = True
    for i in range(3):
        s.add(make_seq(f"s{i}", list(range(10 * i + 1, 10 * i + 11)), max_tokens=4))
    shapes = []
    while s.has_unfinished():
        out = s.schedule()
        assert out.shape == StepShape.of(out.scheduled)
        shapes.append(out.shape)
        s.update_after_step(out, {e.seq_id: 7 for e in out.scheduled if e.do_sample})
    assert shapes[0].num_tokens == 16  # prompt chunks under the token budget
    assert any(sh.num_seqs and sh.num_tokens == sh.num_seqs for sh in shapes)  # and decode-only steps
