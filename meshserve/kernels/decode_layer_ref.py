"""The one-launch decoder layer's reference (triton_decode_layer.decode_layer): the plain path's ops composed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meshserve.kernels.attention_ref import paged_attention_ref
from meshserve.kernels.decode_layer_weights import DecodeLayerWeights
from meshserve.kernels.moe_ref import fused_experts_ref, softmax_topk_ref
from meshserve.kernels.quant_ref import fp8_weight_only_ref, int4_linear_ref
from meshserve.kernels.triton_ops import qkv_rope_cache_ref, rms_norm_ref, silu_and_mul_ref


def decode_layer_ref(h: torch.Tensor, w: DecodeLayerWeights, positions: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor, kv_cache: torch.Tensor, meta, scale: float, num_heads: int,
                     num_kv_heads: int, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """The plain path's ops composed (rms_norm, the projections, qkv_rope_cache's split / norm / rotary / write,
    paged attention, SiLU-and-mul): h [1, HIDDEN] -> the next residual stream; writes the cache as it goes."""
    def linear(x, i, weight, bias):  # the i-th projection: quantized weights as the batch-1 GEMVs read them
        if w.fp8:
            return fp8_weight_only_ref(x, weight, w.scales[i], bias)
        if w.int4:
            return int4_linear_ref(x, weight, w.scales[i], w.zeros[i], w.group_size, None, bias)
        return F.linear(x, weight, bias)

    dt = h.dtype
    qkv = linear(rms_norm_ref(h, w.ln1, w.eps), 0, w.wqkv, w.bqkv)
    q = qkv_rope_cache_ref(qkv, positions, cos_cache, sin_cache, w.q_norm, w.k_norm, w.qk_eps, kv_cache,
                           meta.slot_mapping, num_heads, num_kv_heads, k_scale, v_scale)
    attn = paged_attention_ref(q, kv_cache, meta, scale, None, k_scale, v_scale).flatten(1)
    h2 = (linear(attn, 1, w.wo, w.bo).float() + h.float()).to(dt)
    x = rms_norm_ref(h2, w.ln2, w.eps)
    if w.moe:
        top_k, renormalize, scaling = w.routing
        weights, ids = softmax_topk_ref(F.linear(x, w.wr), top_k, renormalize, scaling, w.expert_load)
        return (fused_experts_ref(x, w.wgu, w.wd, weights, ids).float() + h2.float()).to(dt)
    gu = silu_and_mul_ref(linear(x, 2, w.wgu, w.bgu))
    return (linear(gu, 3, w.wd, w.bd).float() + h2.float()).to(dt)
