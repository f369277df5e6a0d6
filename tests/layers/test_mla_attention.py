"""The MLA layer: steps mixing decodes, speculative verify rows (a few new tokens) and prefill chunks route
each sequence to its form (up to ABSORBED_MAX_QUERY_LEN new tokens absorbed, longer chunks expanded) and give
the all-expanded result; the Triton path (interpreter without CUDA) gives the same, with the prefill context
cut into workspace chunks when the layer has a workspace."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.mla_ref import mla_prefill_ref, write_latent_ref
from meshserve.layers import mla_attention
from meshserve.layers.backend_selection import KernelSelection
from meshserve.layers.mla_attention import (
    ABSORBED_MAX_QUERY_LEN,
    MLAAttention,
    bind_prefill_workspace,
    decode_part,
    per_query_meta,
    prefill_part,
)
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

    assert ABSORBED_MAX_QUERY_LEN == 8
    # a decode row, a 9-token chunk (expanded), a 3-token verify row (absorbed), a 10-token chunk
    meta = _meta([1, 9, 3, 10], [7, 9, 20, 30], block_size=4, num_blocks=20)
    (d_rows, d_meta), (p_rows, p_meta) = decode_part(meta), prefill_part(meta)
    assert d_rows.tolist() == [0, 10, 11, 12] and p_rows.tolist() == list(range(1, 10)) + list(range(13, 23))
    assert d_meta.seq_lens_cpu == [7, 20] and d_meta.query_start_loc_cpu == [0, 1, 4] and d_meta.max_query_len == 3
    assert p_meta.query_start_loc_cpu == [0, 9, 19] and p_meta.max_seq_len == 30
    assert torch.equal(p_meta.block_tables, meta.block_tables[[1, 3]])
    assert decode_part(meta)[1] is d_meta  # every layer of the step shares one split
    assert d_meta.query_lens_cpu == [1, 3] and p_meta.query_lens_cpu == [9, 10]
    assert decode_part(_meta([9, 12], [9, 15], 4, 8)) is None
    assert prefill_part(_meta([1, 8], [3, 15], 4, 8)) is None


def test_per_query_meta_cuts_each_verify_row_at_its_causal_limit():
    from tests.kernels.test_mla import _meta

    meta = _meta([1, 3, 2], [7, 20, 5], block_size=4, num_blocks=12)
    sub = per_query_meta(meta)
    assert sub.seq_lens_cpu == [7, 18, 19, 20, 4, 5] and sub.seq_lens.tolist() == sub.seq_lens_cpu
    assert sub.query_start_loc_cpu == list(range(7)) and sub.max_query_len == 1
    assert torch.equal(sub.block_tables, meta.block_tables[[0, 1, 1, 1, 2, 2]])
    assert per_query_meta(meta) is sub


STEPS = {  # decode rows, verify rows (2-8 tokens over a context), chunks longer than 8 tokens
    "mixed": ([1, 12, 1, 3, 9], [7, 12, 9, 10, 40]),
    "decode": ([1, 1, 1], [1, 6, 13]),
    "verify": ([4, 2, 8], [30, 9, 8]),
    "prefill": ([10, 9], [10, 21]),
}


@pytest.mark.parametrize("q_lens,seq_lens", STEPS.values(), ids=STEPS.keys())
def test_every_step_shape_equals_the_expanded_form(q_lens, seq_lens):
    got, expected = _run(MLAAttention(4, 16, 8, 24, 32, scale=0.25), q_lens, seq_lens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="the Triton interpreter on CPU")
@pytest.mark.parametrize("chunk_tokens", [None, 16])
@pytest.mark.parametrize("q_lens,seq_lens", [STEPS["mixed"], STEPS["verify"]], ids=["mixed", "verify"])
def test_triton_path_in_the_interpreter(monkeypatch, q_lens, seq_lens, chunk_tokens):
    """Decode and verify rows through the absorbed kernel, longer chunks through the batched expanded path,
    with the whole context at once or 16-token workspace chunks (the 40-token context spans three)."""
    from meshserve.kernels.mla_prefill_workspace import MLAPrefillWorkspace, WorkspaceShape

    monkeypatch.setattr(mla_attention.MLAAttention, "_use_triton", lambda self, x: True)
    layer = MLAAttention(4, 16, 8, 24, 32, scale=0.25)
    layer.kernels = KernelSelection(attention_backend="triton")
    if chunk_tokens:
        layer.prefill_workspace = MLAPrefillWorkspace(
            WorkspaceShape(chunk_tokens, 64, 4, 16, 8, 24, 32, torch.float32), "cpu")
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
    got, expected = _run(layer, [10, 9], [10, 21])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    layer.kernels = KernelSelection(attention_backend="triton")
    _run(layer, [10, 9], [10, 21])
    assert batched == [1]


def test_bind_prefill_workspace_shares_one_sized_from_the_step_budget(monkeypatch):
    """One workspace for every MLA layer, only where prefill runs batched on a GPU; its size is the
    arithmetic of WorkspaceShape (what the memory profile then sees allocated)."""
    from torch import nn

    from meshserve.kernels import mla_prefill_workspace as ws

    model = nn.ModuleList([MLAAttention(4, 16, 8, 24, 32, scale=0.25) for _ in range(3)])
    triton = KernelSelection(attention_backend="triton")
    assert bind_prefill_workspace(model, triton, 512, torch.float32, torch.device("cpu")) is None
    assert bind_prefill_workspace(model, KernelSelection(), 512, torch.float32, torch.device("cuda")) is None
    assert bind_prefill_workspace(model, KernelSelection(attention_backend="triton", mla_prefill_ref=True), 512,
                                  torch.float32, torch.device("cuda")) is None
    made = []
    monkeypatch.setattr(mla_attention, "MLAPrefillWorkspace",
                        lambda shape, device: made.append(shape) or ws.MLAPrefillWorkspace(shape, "cpu"))
    workspace = bind_prefill_workspace(model, triton, 512, torch.float32, torch.device("cuda"))
    assert made == [ws.WorkspaceShape(ws.MIN_CHUNK_TOKENS, 512, 4, 16, 8, 24, 32, torch.float32)]
    assert all(layer.prefill_workspace is workspace for layer in model)


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
