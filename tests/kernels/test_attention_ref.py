"""The torch reference attention takes a mixed-step graph's padding: slot -1, q_len-0 sequences, trailing tokens."""

from __future__ import annotations

import itertools

import torch

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.kernels.attention_ref import paged_attention_ref, write_kv_ref


def _meta(
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
    real = _meta([0, 3, 4], [6, 5], [[1, 2], [3, 4]], [1 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 4 * 4 + 0])
    cache = torch.randn(2, num_blocks, block_size, hkv, d)
    cache[:, 0] = 0
    cache[:, 5] = 0
    q, k, v = torch.randn(4, h, d), torch.randn(4, hkv, d), torch.randn(4, hkv, d)
    plain_cache = cache.clone()
    write_kv_ref(k, v, plain_cache, real.slot_mapping)
    plain = paged_attention_ref(q, plain_cache, real, scale=0.3)

    # the same step padded to 8 tokens and 4 sequence slots, as MixedStepGraphs pads it
    padded = _meta(
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
