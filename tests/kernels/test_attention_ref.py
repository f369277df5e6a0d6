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
