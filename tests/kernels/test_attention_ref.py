"""The torch reference attention on CUDA-graph-padded metadata (it is the oracle and the CPU path of graph
buckets): padding tokens have slot -1, padding sequences have q_len 0 and seq_len 0, and tokens at or past
query_start_loc[B] belong to no sequence."""

import itertools

import torch

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.kernels.attention_ref import paged_attention_ref, write_kv_ref


def _meta(qsl, seq_lens, tables):
    return AttentionMetadata(
        slot_mapping=torch.zeros(qsl[-1], dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(b - a for a, b in itertools.pairwise(qsl)),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )


def test_write_kv_skips_padding_slots():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(5, 2, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    slots = torch.tensor([3, -1, 0, -1, 6])
    cache = torch.zeros(2, 2, 4, 2, 8)
    write_kv_ref(k, v, cache, slots)
    flat = cache.view(2, 8, 2, 8)
    torch.testing.assert_close(flat[0, [3, 0, 6]], k[[0, 2, 4]], atol=0, rtol=0)
    torch.testing.assert_close(flat[1, [3, 0, 6]], v[[0, 2, 4]], atol=0, rtol=0)
    assert (flat[:, [1, 2, 4, 5, 7]] == 0).all()  # nothing else written


def test_padded_metadata_gives_real_rows_and_zero_padding():
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(2, 6, 4, 1, 16, generator=g)
    real = _meta([0, 5, 6], [5, 11], [[2, 0, 0], [4, 1, 5]])
    query = torch.randn(6, 2, 16, generator=g)
    # bucket T=9, B=4: two q_len-0 / seq_len-0 sequences and three tokens in no sequence (garbage queries)
    padded = _meta([0, 5, 6, 6, 6], [5, 11, 0, 0], [[2, 0, 0], [4, 1, 5], [0, 0, 0], [0, 0, 0]])
    pq = torch.cat([query, torch.full((3, 2, 16), 1e4)])
    out = paged_attention_ref(pq, cache, padded, 0.25, None)
    torch.testing.assert_close(out[:6], paged_attention_ref(query, cache, real, 0.25, None), atol=0, rtol=0)
    assert (out[6:] == 0).all()
    assert torch.isfinite(out).all()


def _meta_with_slots(
    qsl: list[int], seq_lens: list[int], tables: list[list[int]], slots: list[int]
) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(qsl),
        seq_lens=torch.tensor(seq_lens),
        block_tables=torch.tensor(tables),
        max_query_len=max(b - a for a, b in itertools.pairwise(qsl)),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )


def test_padding_rows_are_zero_and_write_nothing():
    torch.manual_seed(0)
    num_blocks, block_size, hkv, h, d = 6, 4, 2, 4, 8
    # sequence 0: 3 cached + 3 new tokens on blocks 1, 2; sequence 1: 1 new token after 4 cached on block 3, 4
    real = _meta_with_slots([0, 3, 4], [6, 5], [[1, 2], [3, 4]], [1 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 4 * 4 + 0])
    cache = torch.randn(2, num_blocks, block_size, hkv, d)
    cache[:, 0] = 0
    cache[:, 5] = 0
    q, k, v = torch.randn(4, h, d), torch.randn(4, hkv, d), torch.randn(4, hkv, d)
    plain_cache = cache.clone()
    write_kv_ref(k, v, plain_cache, real.slot_mapping)
    plain = paged_attention_ref(q, plain_cache, real, scale=0.3)

    # the same step padded to 8 tokens and 4 sequence slots, as MixedStepGraphs pads it
    padded = _meta_with_slots(
        [0, 3, 4, 4, 4], [6, 5, 0, 0], [[1, 2], [3, 4], [0, 0], [0, 0]], real.slot_mapping.tolist() + [-1] * 4
    )
    padded_cache = cache.clone()
    pad = torch.randn(4, hkv, d)
    write_kv_ref(torch.cat([k, pad]), torch.cat([v, pad]), padded_cache, padded.slot_mapping)
    out = paged_attention_ref(torch.cat([q, torch.randn(4, h, d)]), padded_cache, padded, scale=0.3)
    assert torch.equal(padded_cache, plain_cache)  # slot -1 wrote nothing (not the last slot either)
    assert not padded_cache[:, 0].any() and not padded_cache[:, 5].any()
    torch.testing.assert_close(out[:4], plain)
    assert not out[4:].any()  # tokens in no sequence
