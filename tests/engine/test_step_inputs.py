"""Batch preparation: a sequence scheduled behind its own verify step (async speculative decoding) moves back
on the device by the proposals that step rejected: positions, KV slots and sequence length; its pending token
comes from the verify row's own token."""

from __future__ import annotations

import torch

from meshserve.engine.scheduler_output import ScheduledSequence
from meshserve.engine.step_inputs import StepInputBuilder
from meshserve.sampling import SamplingParams


def _entry(seq_id, token_ids, start, table, unverified=0, spec=0):
    return ScheduledSequence(
        seq_id,
        token_ids,
        start,
        table,
        SamplingParams(temperature=0),
        True,
        num_spec_tokens=spec,
        num_unverified_tokens=unverified,
    )


def test_rows_behind_a_verify_step_move_back_by_its_rejected_count():
    builder = StepInputBuilder(block_size=4, device=torch.device("cpu"))
    # "a" verified 3 proposals at positions 6..9 (placed as if all were accepted: now 10..13, the pending
    # token then 3 proposals); "b" is a plain decode behind a plain step; "c" a prefill chunk
    scheduled = [
        _entry("a", [-1, 40, 41, 42], 10, [7, 3, 9, 5], unverified=3, spec=3),
        _entry("b", [-1], 5, [2, 8]),
        _entry("c", [11, 12, 13], 0, [6]),
    ]
    last_sampled = torch.tensor([77, 99])  # b's sampled id, then a's own token from its verify row
    last_rows = {"b": 0, "a": 1}
    last_rejected = torch.tensor([0, 2])  # a accepted 1 of 3: its row moves back by 2
    ids, pos, meta = builder.build(scheduled, 0, last_sampled, last_rows, last_rejected)
    assert ids.tolist() == [99, 40, 41, 42, 77, 11, 12, 13]
    assert pos.tolist() == [8, 9, 10, 11, 5, 0, 1, 2]
    # a's positions 8..11 sit in its blocks 3 (8 = block index 2 -> id 9) and 5 (11 -> index 2 too)
    assert meta.slot_mapping.tolist() == [9 * 4 + 0, 9 * 4 + 1, 9 * 4 + 2, 9 * 4 + 3, 8 * 4 + 1, 24, 25, 26]
    assert meta.seq_lens.tolist() == [12, 6, 3] and meta.seq_lens_cpu == [12, 6, 3]
    assert meta.max_seq_len == 14  # the host's bound: all accepted
    # the decode/prefill split every attention backend reads, counted once here
    assert meta.query_lens_cpu == [4, 1, 3] and meta.num_single_query_seqs == 1

    # nothing rejected: placed where the host put it
    ids, pos, meta = builder.build(scheduled, 1, last_sampled, last_rows, torch.tensor([0, 0]))
    assert pos.tolist()[:4] == [10, 11, 12, 13] and meta.seq_lens.tolist() == [14, 6, 3]
    assert meta.slot_mapping.tolist()[:4] == [9 * 4 + 2, 9 * 4 + 3, 5 * 4 + 0, 5 * 4 + 1]


def test_small_decode_batches_built_with_lists_give_the_numpy_buffer(monkeypatch):
    """A few one-token rows take the plain-list path (_small_decode_parts): the same host buffer, split sizes
    and host lists as the numpy path (_parts), over random batches of 1-8 rows with pending tokens (async
    scheduling), block tables of odd and even lengths and rows of different widths; and the same step."""
    import random

    import numpy as np

    from meshserve.engine import step_inputs

    rng = random.Random(3)
    builder = StepInputBuilder(block_size=4, device=torch.device("cpu"))
    for trial in range(200):
        n = rng.randint(1, 8)
        scheduled, last_rows = [], {}
        for i in range(n):
            context = rng.randint(0, 40)  # tokens before this one
            table = rng.sample(range(1, 100), context // 4 + 1 + rng.randint(0, 2))
            token = -1 if rng.random() < 0.6 else rng.randint(3, 500)
            scheduled.append(_entry(f"s{i}", [token], context, table))
            last_rows[f"s{i}"] = rng.randrange(8)
        last_sampled = torch.arange(100, 108) if trial % 5 else None  # None: a later stage, no pending fill
        small = builder._small_decode_parts(scheduled, last_sampled, last_rows)
        plain = builder._parts(scheduled, last_sampled, last_rows)
        assert np.array_equal(small[0], plain[0]) and small[1] == plain[1] and small[2] == plain[2]
        ids, pos, meta = builder.build(scheduled, trial % 2, last_sampled, last_rows)
        monkeypatch.setattr(step_inputs, "SMALL_DECODE_ROWS", 0)  # the numpy path for the same step
        ids2, pos2, meta2 = builder.build(scheduled, trial % 2, last_sampled, last_rows)
        monkeypatch.undo()
        assert ids.tolist() == ids2.tolist() and pos.tolist() == pos2.tolist()
        for field in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
            assert getattr(meta, field).tolist() == getattr(meta2, field).tolist()
        assert (meta.max_query_len, meta.max_seq_len, meta.query_start_loc_cpu, meta.seq_lens_cpu,
                meta.query_lens_cpu) == (meta2.max_query_len, meta2.max_seq_len, meta2.query_start_loc_cpu,
                                         meta2.seq_lens_cpu, meta2.query_lens_cpu)
