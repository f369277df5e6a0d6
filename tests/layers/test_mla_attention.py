"""The MLA layer: steps mixing decodes and prefill chunks route each sequence to its form (decode rows
absorbed, prefill rows expanded) and give the all-expanded result; the Triton path (interpreter without
CUDA) gives the same."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.mla_ref import mla_prefill_ref, write_latent_ref
from meshserve.layers import mla_attention
from meshserve.layers.backend_selection import KernelSelection
from meshserve.layers.mla_attention import MLAAttention, split_decode_prefill
from tests.kernels.test_mla import _problem


def _run(layer: MLAAttention, q_lens, seq_lens):
    meta, cache, q_nope, q_pe, kv_c, k_pe, kv_b = _problem(4, 16, 8, 24, 32, q_lens, seq_lens)
    layer.kv_cache = cache.clone()
    got = layer(q_nope, q_pe, kv_c, k_pe, kv_b, meta)
    write_latent_ref(kv_c, k_pe, cache, meta.slot_mapping)
    assert torch.equal(layer.kv_cache, cache)
    expected = mla_prefill_ref(q_nope, q_pe, cache, kv_b, meta, layer.scale).flatten(1)
    return got, expected


def test_split_decode_prefill_packs_each_group():
    from tests.kernels.test_mla import _meta

    meta = _meta([1, 4, 1, 3], [7, 4, 9, 10], block_size=4, num_blocks=12)
    (d_rows, d_meta), (p_rows, p_meta) = split_decode_prefill(meta, "cpu")
    assert d_rows.tolist() == [0, 5] and p_rows.tolist() == [1, 2, 3, 4, 6, 7, 8]
    assert d_meta.seq_lens_cpu == [7, 9] and d_meta.query_start_loc_cpu == [0, 1, 2] and d_meta.max_query_len == 1
    assert p_meta.query_start_loc_cpu == [0, 4, 7] and p_meta.max_seq_len == 10
    assert torch.equal(p_meta.block_tables, meta.block_tables[[1, 3]])
    assert split_decode_prefill(_meta([3, 2], [3, 5], 4, 4), "cpu") == (None, None)


@pytest.mark.parametrize("q_lens,seq_lens", [([1, 4, 1, 3], [7, 4, 9, 10]), ([1, 1, 1], [1, 6, 13]),
                                             ([5, 2], [5, 9])], ids=["mixed", "decode", "prefill"])
def test_every_step_shape_equals_the_expanded_form(q_lens, seq_lens):
    got, expected = _run(MLAAttention(4, 16, 8, 24, 32, scale=0.25), q_lens, seq_lens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="the Triton interpreter on CPU")
def test_triton_path_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(mla_attention.MLAAttention, "_use_triton", lambda self, x: True)
    layer = MLAAttention(4, 16, 8, 24, 32, scale=0.25)
    layer.kernels = KernelSelection(attention_backend="triton")
    got, expected = _run(layer, [1, 4, 1, 3], [7, 4, 9, 10])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
