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
from meshserve.layers.mla_attention import MLAAttention, decode_part, prefill_part
from tests.kernels.test_mla import _problem


def _run(layer: MLAAttention, q_lens, seq_lens):
    meta, cache, q_nope, q_pe, kv_c, k_pe, kv_b = _problem(4, 16, 8, 24, 32, q_lens, seq_lens)
    layer.kv_cache = cache.clone()
    got = layer(q_nope, q_pe, kv_c, k_pe, kv_b, meta)
    write_latent_ref(kv_c, k_pe, cache, meta.slot_mapping)
    assert torch.equal(layer.kv_cache, cache)
    expected = mla_prefill_ref(q_nope, q_pe, cache, kv_b, meta, layer.scale).flatten(1)
    return got, expected


def test_decode_and_prefill_parts_pack_each_group_once_per_step():
    from tests.kernels.test_mla import _meta

    meta = _meta([1, 4, 1, 3], [7, 4, 9, 10], block_size=4, num_blocks=12)
    (d_rows, d_meta), (p_rows, p_meta) = decode_part(meta), prefill_part(meta)
    assert d_rows.tolist() == [0, 5] and p_rows.tolist() == [1, 2, 3, 4, 6, 7, 8]
    assert d_meta.seq_lens_cpu == [7, 9] and d_meta.query_start_loc_cpu == [0, 1, 2] and d_meta.max_query_len == 1
    assert p_meta.query_start_loc_cpu == [0, 4, 7] and p_meta.max_seq_len == 10
    assert torch.equal(p_meta.block_tables, meta.block_tables[[1, 3]])
    assert decode_part(meta)[1] is d_meta  # every layer of the step shares one split
    assert decode_part(_meta([3, 2], [3, 5], 4, 4)) is None
    assert prefill_part(_meta([1, 1], [3, 5], 4, 4)) is None


@pytest.mark.parametrize("q_lens,seq_lens", [([1, 4, 1, 3], [7, 4, 9, 10]), ([1, 1, 1], [1, 6, 13]),
                                             ([5, 2], [5, 9])], ids=["mixed", "decode", "prefill"])
def test_every_step_shape_equals_the_expanded_form(q_lens, seq_lens):
    got, expected = _run(MLAAttention(4, 16, 8, 24, 32, scale=0.25), q_lens, seq_lens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="the Triton interpreter on CPU")
@pytest.mark.parametrize("q_lens,seq_lens", [([1, 4, 1, 3], [7, 4, 9, 10]), ([5, 2], [5, 9])],
                         ids=["mixed", "prefill"])
def test_triton_path_in_the_interpreter(monkeypatch, q_lens, seq_lens):
    """Decode rows through the absorbed kernel, prefill chunks through the batched expanded path."""
    monkeypatch.setattr(mla_attention.MLAAttention, "_use_triton", lambda self, x: True)
    layer = MLAAttention(4, 16, 8, 24, 32, scale=0.25)
    layer.kernels = KernelSelection(attention_backend="triton")
    got, expected = _run(layer, q_lens, seq_lens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_reference_switch_keeps_prefill_per_sequence_on_the_triton_path(monkeypatch):
    """kernels.mla_prefill_ref (MESHSERVE_MLA_PREFILL_REF=1): prefill chunks skip the batched path."""
    batched = []
    monkeypatch.setattr(mla_attention, "mla_prefill", lambda *a, **k: batched.append(1))
    layer = MLAAttention(4, 16, 8, 24, 32, scale=0.25)
    layer.kernels = KernelSelection(attention_backend="triton", mla_prefill_ref=True)
    monkeypatch.setattr(mla_attention.MLAAttention, "_use_triton", lambda self, x: True)
    monkeypatch.setattr(mla_attention.MLAAttention, "_absorbed",
                        lambda self, q_nope, q_pe, w, meta, triton: q_nope.new_zeros(q_nope.shape[0], 4, 24))
    monkeypatch.setattr("meshserve.kernels.triton_mla.write_latent",
                        lambda kv_c, k_pe, cache, slots: write_latent_ref(kv_c, k_pe, cache, slots))
    got, expected = _run(layer, [5, 2], [5, 9])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    layer.kernels = KernelSelection(attention_backend="triton")
    _run(layer, [5, 2], [5, 9])
    assert batched == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_step_at_v2_lite_shapes_gpu():
    """The layer on the GPU (latent write, absorbed decode rows, batched prefill) against the all-expanded
    reference at DeepSeek-V2-Lite's shapes: chunks over prefixes and from scratch beside decode rows, bf16."""
    q_lens, seq_lens = [1, 700, 1, 64, 1500, 1], [2000, 700, 33, 3000, 4000, 4096]
    meta, cache, q_nope, q_pe, kv_c, k_pe, kv_b = _problem(16, 128, 64, 128, 512, q_lens, seq_lens, 16,
                                                           torch.bfloat16, "cuda")
    layer = MLAAttention(16, 128, 64, 128, 512, scale=192**-0.5)
    layer.kernels = KernelSelection(attention_backend="triton")
    layer.kv_cache = cache.clone()
    got = layer(q_nope, q_pe, kv_c, k_pe, kv_b, meta)
    write_latent_ref(kv_c, k_pe, cache, meta.slot_mapping)
    assert torch.equal(layer.kv_cache, cache)
    expected = mla_prefill_ref(q_nope.float(), q_pe.float(), cache.float(), kv_b.float(), meta, layer.scale)
    torch.testing.assert_close(got.float(), expected.flatten(1), atol=2e-2, rtol=2e-2)
