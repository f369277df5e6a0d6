"""The attention layer's fused prologue over an fp8 cache (layers/attention.py): forward_qkv hands the layer's
k_scale / v_scale to the backend, so the cache holds what the unfused path (reference prologue) writes."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.kernels.quant_ref import FP8_DTYPE

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU runs tests/gpu)"),
]


def test_fused_prologue_writes_the_fp8_cache_with_the_layers_scales():
    from meshserve.kernels.triton_attention import TritonAttentionBackend
    from meshserve.kernels.triton_ops import qkv_rope_cache_ref
    from meshserve.layers.attention import Attention
    from meshserve.layers.rotary import RotaryEmbedding

    h, hkv, d, t, block = 4, 2, 16, 3, 4
    layer = Attention(h, d, hkv, d**-0.5)
    layer.backend, layer.fused_prologue = TritonAttentionBackend(), True
    layer.k_scale, layer.v_scale = 0.25, 1 / 512  # |v| ~ 1 / (1/512) saturates at 448
    layer.kv_cache = torch.zeros(2, 4, block, hkv, d).to(FP8_DTYPE)
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0, rope_scaling=None), d, 64)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g)
    positions = torch.tensor([3, 0, 5])
    slots = torch.tensor([3, 4, 9])
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.tensor([0, 1, 2, 3], dtype=torch.int32),
                             seq_lens=torch.tensor([4, 1, 6], dtype=torch.int32),
                             block_tables=torch.tensor([[0, 0], [1, 0], [1, 2]], dtype=torch.int32),
                             max_query_len=1, max_seq_len=6, query_start_loc_cpu=[0, 1, 2, 3],
                             seq_lens_cpu=[4, 1, 6])
    assert layer.can_fuse_prologue
    layer.forward_qkv(qkv, positions, rope, None, None, meta)
    expect = torch.zeros_like(layer.kv_cache)
    qkv_rope_cache_ref(qkv, positions, rope.cos_cache, rope.sin_cache, None, None, 0.0, expect, slots, h, hkv,
                       0.25, 1 / 512)
    got, ref = layer.kv_cache.float(), expect.float()
    # one e4m3 step at most (the interpreter's fp8 cast lands a binade low where the reference rounded up to
    # a power of two); unscaled K would be 4x off, unscaled V ~512x
    assert ((got - ref).abs() <= ref.abs() / 2).all() and (got == ref).float().mean() > 0.9
    assert got[1].abs().max() == 448
