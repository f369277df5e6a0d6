"""kernels/kv_layout.py's rule inside the Triton kernels: where V lies in a cache block, in either layout.

* ``v_offset``: the element offset of one V value (block, slot in the block, KV head, feature) from the
  cache's start: what the cache writers (reshape_and_cache, the fused prologue, the fused decode launch) store to.
* ``v_head_base``: where a KV head's V starts in block 0: what the attention tiles offset their V loads from
  (triton_attention_tile.load_v_transposed in the transposed layout).
V_T: V stored as [Hkv, D, block_size] in each block of a contiguous cache (kv_layout.v_transposed), so the
head's stride there is D x block_size elements (stride_ch * BLOCK_SIZE: stride_ch is head_dim); else V keeps
K's order, one stride_ckv beyond it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def v_offset(blk, off, h, d, stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd, BLOCK_SIZE: tl.constexpr,
             V_T: tl.constexpr):
    if V_T:
        return stride_ckv + blk * stride_cb + h * (stride_ch * BLOCK_SIZE) + d * BLOCK_SIZE + off
    else:
        return stride_ckv + blk * stride_cb + off * stride_cs + h * stride_ch + d * stride_cd


@triton.jit
def v_head_base(cache_ptr, kvh, stride_ckv, stride_ch, BLOCK_SIZE: tl.constexpr, V_T: tl.constexpr):
    if V_T:
        return cache_ptr + stride_ckv + kvh * (stride_ch * BLOCK_SIZE)
    else:
        return cache_ptr + kvh * stride_ch + stride_ckv
