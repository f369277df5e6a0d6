"""Plain torch attention over the paged KV cache: the CPU path and the reference for the GPU kernels.

KV cache layout (per layer): [2, num_blocks, block_size, num_kv_heads, head_dim]; index 0 is K, 1 is V (an fp8
cache may hold each block's V as [num_kv_heads, head_dim, block_size]: kernels/kv_layout.py, read through v_rows).

An fp8 (float8_e4m3fn) cache holds K / k_scale and V / v_scale (saturated at +-448); reads multiply back. With
a 16-bit cache the scales are 1.0 and unused.
"""

import torch
import torch.nn.functional as F

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.kernels.kv_layout import v_rows, v_transposed
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
    if v_transposed(kv_cache):  # a strided view of the blocks' [Hkv, D, block_size] V: index it per token
        v = v_rows(kv_cache).view(flat.dtype)
        v[slot_mapping // block_size, slot_mapping % block_size] = value.to(flat.dtype)
    else:
        flat[1].index_copy_(0, slot_mapping, value.to(flat.dtype))


def gather_kv_ref(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, k_scale: float = 1.0,
                  v_scale: float = 1.0, dtype: torch.dtype | None = None):
    """K and V [seq_len, Hkv, D] of one sequence, read through its block table (an fp8 cache dequantized to
    dtype, by default fp32)."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    k = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
    v = v_rows(kv_cache)[blocks].flatten(0, 1)[:seq_len]
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
