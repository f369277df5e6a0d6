"""The per-tile step the Triton attention kernels share: one KV tile of an fp32 online softmax.

* ``online_softmax_step``: fold a tile's scores (log2 units, scale folded in) into the running max and sum;
  every attention kernel's tile (paged prefill, unified and decode, MLA prefill and decode).
* ``attend_paged_kv_tile``: one tile of BLOCK_N tokens of the paged KV cache [2, blocks, block_size, Hkv, D],
  gathered through the block table: K load (fp8 dequant), scores, causal / window / validity mask, softmax
  step, V load, accumulate. The prefill, unified and split-K decode kernels of triton_attention.py and
  triton_unified_attention.py walk their KV ranges with it.
* ``attend_full_kv_tile``: the same without masks, for the causal kernels' tiles that lie wholly below the
  diagonal (AttentionTileConfig.diag_mask_only).

Triton inlines @triton.jit calls, so a kernel compiles to the same code as with the step written in its loop.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(qk, m_i, l_i):
    """(p, alpha, m_new, l_new) for scores qk [ROWS, N]: p = exp2(qk - m_new) is the tile's weights, alpha
    rescales what was accumulated under the old max m_i. Masked scores are -inf (p 0); m_i starts finite
    (_NEG_BIG), so a row with nothing visible yet stays at p 0, never nan."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def attend_paged_kv_tile(
    q,
    q_pos,
    acc,
    m_i,
    l_i,
    kv_pos,
    kv_valid,
    window,
    bt_row,
    k_base,
    v_base,
    d,
    d_mask,
    scale_log2,
    k_scale,
    v_scale,
    stride_cb,
    stride_cs,
    stride_cd,
    BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(acc, m_i, l_i) after the KV tokens kv_pos [BLOCK_N] (those with kv_valid; block table row bt_row, K/V
    of one KV head at k_base / v_base) for the queries q [ROWS, BLOCK_D] at positions q_pos [ROWS].
    CAUSAL: a query sees keys up to its position (and with USE_WINDOW only the last `window`); else every
    valid key (the decode kernel folds its window into kv_valid)."""
    blk = tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
    off = blk * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cs
    k = tl.load(
        k_base + off[None, :] + d[:, None] * stride_cd, mask=kv_valid[None, :] & d_mask[:, None], other=0.0
    )  # [BLOCK_D, BLOCK_N]
    if KV_FP8:  # the fp8 cache holds K / k_scale (rounded to the query dtype like the reference)
        k = (k.to(tl.float32) * k_scale).to(q.dtype)
    qk = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2
    if CAUSAL:
        mask = kv_valid[None, :] & (kv_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            mask = mask & (kv_pos[None, :] > q_pos[:, None] - window)
    else:
        mask = kv_valid[None, :]
    qk = tl.where(mask, qk, float("-inf"))
    p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
    v = tl.load(
        v_base + off[:, None] + d[None, :] * stride_cd, mask=kv_valid[:, None] & d_mask[None, :], other=0.0
    )  # [BLOCK_N, BLOCK_D]
    if KV_FP8:
        v = (v.to(tl.float32) * v_scale).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def attend_full_kv_tile(
    q,
    acc,
    m_i,
    l_i,
    kv_pos,
    bt_row,
    k_base,
    v_base,
    d,
    d_mask,
    scale_log2,
    k_scale,
    v_scale,
    stride_cb,
    stride_cs,
    stride_cd,
    BLOCK_SIZE: tl.constexpr,
    EVEN_D: tl.constexpr,
    KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """attend_paged_kv_tile for a tile every query row sees whole (below the causal diagonal, inside the
    window): no score mask and, with EVEN_D (BLOCK_D == head_dim), no load predicates."""
    blk = tl.load(bt_row + kv_pos // BLOCK_SIZE).to(tl.int64)
    off = blk * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cs
    if EVEN_D:
        k = tl.load(k_base + off[None, :] + d[:, None] * stride_cd)  # [BLOCK_D, BLOCK_N]
    else:
        k = tl.load(k_base + off[None, :] + d[:, None] * stride_cd, mask=d_mask[:, None], other=0.0)
    if KV_FP8:
        k = (k.to(tl.float32) * k_scale).to(q.dtype)
    # online_softmax_step with the scale applied in the exponent's FMA (scale_log2 > 0, so the row max of the
    # scaled scores is the scaled row max): one op per score fewer on the tiles that dominate a long prompt
    qk = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if EVEN_D:
        v = tl.load(v_base + off[:, None] + d[None, :] * stride_cd)  # [BLOCK_N, BLOCK_D]
    else:
        v = tl.load(v_base + off[:, None] + d[None, :] * stride_cd, mask=d_mask[None, :], other=0.0)
    if KV_FP8:
        v = (v.to(tl.float32) * v_scale).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i
