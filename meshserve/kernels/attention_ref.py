"""Plain torch attention over the paged KV cache: the CPU path and the reference for the GPU kernels.

KV cache layout (per layer): [2, num_blocks, block_size, num_kv_heads, head_dim]; index 0 is K, 1 is V.

An fp8 (float8_e4m3fn) cache holds K / k_scale and V / v_scale (saturated at +-448); reads multiply back. With
a 16-bit cache the scales are 1.0 and unused.
"""

import math

import torch
import torch.nn.functional as F

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.kernels.quant_ref import FP8_DTYPE, to_fp8


def is_fp8_cache(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype == FP8_DTYPE


def write_kv_ref(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 k_scale: float = 1.0, v_scale: float = 1.0):
    """Scatter this step's K and V [T, Hkv, D] into their cache slots (reshape-and-cache); slots < 0 (padding
    tokens of a mixed-step graph) write nothing, as in the Triton kernel."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    if is_fp8_cache(kv_cache):  # CPU torch has no fp8 index_copy_: move the bytes
        flat = flat.view(torch.uint8)
        key, value = to_fp8(key, k_scale).view(torch.uint8), to_fp8(value, v_scale).view(torch.uint8)
    flat[0].index_copy_(0, slot_mapping, key.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(flat.dtype))


def gather_kv_ref(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, k_scale: float = 1.0,
                  v_scale: float = 1.0, dtype: torch.dtype | None = None):
    """K and V [seq_len, Hkv, D] of one sequence, read through its block table (an fp8 cache dequantized to
    dtype, by default fp32)."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    k = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
    v = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    if is_fp8_cache(kv_cache):
        dtype = dtype or torch.float32
        k, v = (k.float() * k_scale).to(dtype), (v.float() * v_scale).to(dtype)
    return k, v


def paged_attention_ref(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context.

    query [T, H, D] -> output [T, H, D]. Query j of a sequence with context length L and q_len new tokens
    sits at absolute position L - q_len + j and sees keys 0 .. that position (and, with a sliding window,
    only the last `sliding_window` of them). Padding of a mixed-step graph is allowed: sequences with q_len 0
    attend nothing, and tokens past the last sequence's queries belong to none and get zero rows.
    """
    out = torch.zeros_like(query)
    num_heads, num_kv_heads = query.shape[1], kv_cache.shape[3]
    starts = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        q = query[starts[i] : starts[i + 1]]  # [q_len, H, D]
        q_len = q.shape[0]
        if q_len == 0:  # a padding sequence
            continue
        k, v = gather_kv_ref(kv_cache, meta.block_tables[i], seq_len, k_scale, v_scale, query.dtype)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device).unsqueeze(1)
        k_pos = torch.arange(seq_len, device=query.device).unsqueeze(0)
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.to(q.dtype).transpose(0, 1).unsqueeze(0),
            v.to(q.dtype).transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        out[starts[i] : starts[i + 1]] = o.squeeze(0).transpose(0, 1)
    return out


def decode_fp8dot_ref(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    block_n: int = 128,
) -> torch.Tensor:
    """The decode kernel's fp8dot path (kernels/triton_e4m3_dot.py, one split) over an fp8 cache, with its
    roundings: each q row to e4m3 at scale amax / 448, the scores from the e4m3 products, then per tile of
    block_n tokens the online softmax (log2 units) with P * 448 rounded to e4m3 for the P.V product and summed
    unrounded. The kernel equals it up to fp32 summation order (an e4m3 rounding of P may flip with it)."""
    out = torch.zeros_like(query)
    num_kv_heads = kv_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    log2_e4m3_max = math.log2(448.0)
    starts = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        if starts[i + 1] - starts[i] != 1:  # the decode kernel's rows only
            continue
        k, v = gather_kv_ref(kv_cache, meta.block_tables[i], seq_len)  # the e4m3 values, unscaled
        kv_lo = max(seq_len - sliding_window, 0) if sliding_window else 0
        for h in range(num_kv_heads):
            q = query[starts[i], h * group : (h + 1) * group].float()
            amax = q.abs().amax(1, keepdim=True)
            q_scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
            raw = (q / q_scale).to(FP8_DTYPE).float() @ k[:, h].T  # [G, seq_len]
            s = q_scale * (scale * 1.4426950408889634 * k_scale)
            m = q.new_full((group,), -1.0e30)
            l_sum = q.new_zeros(group)
            acc = q.new_zeros(group, query.shape[2])
            for t0 in range(kv_lo // block_n * block_n, seq_len, block_n):
                lo, hi = max(t0, kv_lo), min(t0 + block_n, seq_len)
                m_new = torch.maximum(m, raw[:, lo:hi].max(1).values * s[:, 0])
                alpha = torch.exp2(m - m_new)
                p = torch.exp2(raw[:, lo:hi] * s - (m_new - log2_e4m3_max)[:, None])  # P * 448
                l_sum = l_sum * alpha + p.sum(1)
                acc = acc * alpha[:, None] + p.to(FP8_DTYPE).float() @ v[lo:hi, h]
                m = m_new
            l_sum = torch.where(l_sum > 0, l_sum, 1.0)  # seq_len 0: zeros, as the kernel gives
            out[starts[i], h * group : (h + 1) * group] = (acc * v_scale / l_sum[:, None]).to(out.dtype)
    return out
