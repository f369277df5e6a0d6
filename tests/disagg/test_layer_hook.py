"""The producer's per-layer hook: which blocks each step of a chunked prefill queues, layer by layer."""

from __future__ import annotations

import torch

from meshserve.disagg.layer_hook import LayerwiseHook, ProducerStream, preempted, queue_ready
from meshserve.disagg.layerwise import LayerJob
from meshserve.engine.scheduler_output import ScheduledSequence
from meshserve.sampling import SamplingParams

BLOCK, LAYERS = 4, 3


class _Sender:
    def __init__(self):
        self.jobs: list[LayerJob] = []

    def put(self, job: LayerJob) -> None:
        self.jobs.append(job)


def _pool() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 16, BLOCK, 2, 8, generator=g) for _ in range(LAYERS)]


def _chunk(seq_id: str, computed: int, n: int, table: list[int]) -> ScheduledSequence:
    return ScheduledSequence(seq_id, [5] * n, computed, table, SamplingParams(), do_sample=False)


def test_each_chunk_sends_its_completed_blocks_and_the_last_chunk_the_partial_one():
    kv, sender = _pool(), _Sender()
    st = ProducerStream("t", "r", num_tokens=10, num_blocks=3, consumer=1)
    hook = LayerwiseHook({"r": st}, sender, kv, BLOCK)
    table = [7, 2, 9]
    sent = []
    for computed, n in ((0, 3), (3, 3), (6, 3), (9, 1)):  # chunks ending at 3, 6, 9, 10 tokens
        hook.begin([_chunk("r", computed, n, table)])
        for layer in range(LAYERS):  # the forward: each layer's hook right after its cache write
            hook.layer_done(layer)
            hook.layer_done(layer)  # (a second call for the same layer queues nothing)
        hook.end()
        sent.append([(j.layer, j.start, j.data.shape[1]) for j in sender.jobs])
        sender.jobs.clear()
    assert sent[0] == []  # 3 tokens: no block complete
    assert sent[1] == [(i, 0, 1) for i in range(LAYERS)]  # block 0 done at 6 tokens
    assert sent[2] == [(i, 1, 1) for i in range(LAYERS)]  # block 1 at 9
    assert sent[3] == [(i, 2, 1) for i in range(LAYERS)]  # the last, partial block at the prompt's end
    assert st.ready_blocks == st.queued_blocks == 3


def test_gathered_data_is_the_layer_blocks_and_unfired_layers_go_at_the_end():
    kv, sender = _pool(), _Sender()
    st = ProducerStream("t", "r", num_tokens=8, num_blocks=2, consumer=1)
    hook = LayerwiseHook({"r": st, "other": ProducerStream("u", "other", 8, 2)}, sender, kv, BLOCK)
    hook.begin([_chunk("r", 0, 8, [3, 11]), _chunk("other", 0, 8, [4, 5]), _chunk("plain", 0, 8, [6, 8])])
    assert hook.active
    hook.layer_done(1)  # only layer 1 has a hook (e.g. a replayed graph ran the others)
    assert [j.layer for j in sender.jobs] == [1]
    hook.end()
    assert sorted(j.layer for j in sender.jobs) == [0, 1, 2]  # only the subscribed request's blocks
    for job in sender.jobs:
        assert job.transfer_id == "t" and job.dst == 1 and job.start == 0
        assert torch.equal(job.data, kv[job.layer][:, [3, 11]])
    assert not hook.active


def test_a_late_subscription_gets_what_is_ready_then_the_end_of_the_stream():
    kv, sender = _pool(), _Sender()
    st = ProducerStream("t", "r", num_tokens=9, num_blocks=3)
    hook = LayerwiseHook({"r": st}, sender, kv, BLOCK)
    hook.begin([_chunk("r", 0, 5, [1, 2, 3])])
    hook.end()
    assert sender.jobs == [] and st.ready_blocks == 1  # nobody subscribed: only the count moves
    st.consumer = 4
    queue_ready(st, sender, kv)
    assert [(j.kind, j.layer, j.start) for j in sender.jobs] == [("layer", i, 0) for i in range(LAYERS)]
    sender.jobs.clear()
    st.ready_blocks, st.block_table, st.first_token = 3, (1, 2, 3), 42  # held at the prefill's end
    queue_ready(st, sender, kv)
    queue_ready(st, sender, kv)  # (the end is queued once)
    assert [(j.kind, j.start) for j in sender.jobs] == [("layer", 1)] * LAYERS + [("done", 0)]
    assert all(torch.equal(j.data, kv[i][:, [2, 3]]) for i, j in enumerate(sender.jobs[:LAYERS]))
    assert sender.jobs[-1].first_token == 42 and sender.jobs[-1].num_blocks == 3


def test_one_sided_jobs_name_the_blocks_and_gather_nothing():
    kv, sender = _pool(), _Sender()
    st = ProducerStream("t", "r", num_tokens=8, num_blocks=2, consumer=1)
    hook = LayerwiseHook({"r": st}, sender, kv, BLOCK, one_sided=True)
    hook.begin([_chunk("r", 0, 5, [3, 11])])
    for layer in range(LAYERS):
        hook.layer_done(layer)
    hook.end()
    jobs = [(j.layer, j.start, j.block_ids, j.data) for j in sender.jobs]
    assert jobs == [(i, 0, (3,), None) for i in range(LAYERS)]  # block 0 complete, no tensor
    sender.jobs.clear()
    st.ready_blocks, st.block_table, st.first_token = 2, (3, 11), 7  # held: the rest, then the end
    queue_ready(st, sender, kv, one_sided=True)
    jobs = [(j.kind, j.start, j.block_ids, j.data) for j in sender.jobs]
    assert jobs == [("layer", 1, (11,), None)] * LAYERS + [("done", 0, (), None)]


def test_one_sided_a_preempted_request_fails_its_stream_or_starts_again():
    kv, sender = _pool(), _Sender()
    st = ProducerStream("t", "r", num_tokens=8, num_blocks=2, consumer=1)
    late = ProducerStream("u", "q", num_tokens=8, num_blocks=2)  # nobody subscribed yet
    hook = LayerwiseHook({"r": st, "q": late}, sender, kv, BLOCK, one_sided=True)
    hook.begin([_chunk("r", 0, 5, [3, 11]), _chunk("q", 0, 5, [4, 12])])
    hook.end()
    assert len(sender.jobs) == LAYERS and late.block_table == (4,)
    sender.jobs.clear()
    # both preempted (blocks released: the announced ones may be read after their reuse) ...
    preempted(st, sender, one_sided=True)
    preempted(late, sender, one_sided=True)
    assert [(j.kind, j.ok) for j in sender.jobs] == [("done", False)] and "preempted" in sender.jobs[0].reason
    assert st.consumer is None  # nothing more is announced to it
    assert (late.ready_blocks, late.block_table) == (0, ())  # a subscription now reads nothing old
    sender.jobs.clear()
    # ... and recomputed from the start into other blocks
    hook.begin([_chunk("q", 0, 5, [8, 9])])
    hook.end()
    assert (late.ready_blocks, late.block_table) == (1, (8,))  # a late subscription reads the new block
    late.consumer = 2
    queue_ready(late, sender, kv, one_sided=True)
    assert {j.block_ids for j in sender.jobs} == {(8,)}


def test_two_sided_a_preempted_request_keeps_what_was_queued_and_nothing_else():
    kv, sender = _pool(), _Sender()
    st = ProducerStream("t", "r", num_tokens=12, num_blocks=3, consumer=1)
    late = ProducerStream("u", "q", num_tokens=12, num_blocks=3)  # nobody subscribed yet
    hook = LayerwiseHook({"r": st, "q": late}, sender, kv, BLOCK)
    hook.begin([_chunk("r", 0, 8, [3, 11, 5]), _chunk("q", 0, 8, [4, 12, 6])])
    hook.end()
    assert len(sender.jobs) == LAYERS and (late.ready_blocks, late.queued_blocks) == (2, 0)
    sender.jobs.clear()
    preempted(st, sender)
    preempted(late, sender)
    assert sender.jobs == []  # the queued blocks were gathered (copied): they stand
    assert (st.ready_blocks, st.queued_blocks) == (2, 2)
    # the unqueued ones were released, maybe reused: a subscription now is sent nothing of them
    assert (late.ready_blocks, late.block_table) == (0, ())
    late.consumer = 2
    queue_ready(late, sender, kv)
    assert sender.jobs == []
    # the recompute's chunks send the rest from the new blocks
    hook.begin([_chunk("r", 0, 12, [7, 8, 9]), _chunk("q", 0, 12, [13, 14, 15])])
    hook.end()
    sent = {(j.transfer_id, j.start, j.data.shape[1]) for j in sender.jobs}
    assert sent == {("t", 2, 1), ("u", 0, 3)}
    assert all(torch.equal(j.data, kv[j.layer][:, [13, 14, 15]]) for j in sender.jobs if j.transfer_id == "u")
