"""Decode attention with the attention prologue inside it: one launch fewer per layer in decode-only steps.

The two-step path of a decode step is triton_ops.qkv_rope_cache (split the QKV projection's output, RMSNorm q
and k per head when the model has q_norm / k_norm, rotate both, write K/V to the cache, return q) and then
triton_attention.decode_attention. ``_decode_fused_split_kernel`` does both in the decode split kernel's grid
(num_seqs, num_kv_heads, num_splits):

* every program builds its GQA group's q rows straight from qkv: the same per-element math and roundings as
  triton_ops._norm_rope_heads, with the variance summed over the two halves as there;
* the program of the split that holds the sequence's last position (seq_len - 1, the current token) writes
  its KV head's K/V of the current token to slot_mapping[token] with the prologue kernel's own code
  (_norm_rope_heads over all KV heads, the store masked to its head: the prologue's tile, so the same bytes
  wherever the compiled kernels sum a head's variance in the same order, which the GPU tests check), so each
  (sequence, KV head) is written exactly once;
* a CTA barrier (bar.sync orders the CTA's global stores before its later loads), then the split's KV tiles
  as triton_attention.decode_split_attend walks them: the current token is read back from the cache, so the
  softmax sees the value as stored (an fp8 cache: quantized, then dequantized) in the same tile as the
  two-step path. Only the writer's own CTA reads that slot's head in this launch, given what the engine's
  decode steps build (engine/step_inputs.py): a row's slot is the cache slot of its position seq_len - 1, in
  its own last block. A slot another program reads (another sequence's or another split's) would be raced.

Padding rows (q_len != 1) exit at once as in the split kernel; a slot < 0 writes nothing; seq_len 0 (CUDA-graph
padding) attends to nothing (zeros), and a slot >= 0 there is still written, by split 0. No host decision
from device values; the splits, the reduce (kernel or inline) and PDL are the split kernel's.

Selected by MESHSERVE_DECODE_FUSED_PROLOGUE=1 (layers/backend_selection.py), used by Attention.forward_qkv in
decode-only steps through TritonAttentionBackend.attend_qkv. Reference: write_qkv then attend (the two-step
path), which tests/kernels/test_triton_decode_fused.py compares it with, outputs and cache bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.kv_layout import v_transposed
from meshserve.kernels.pdl_jit import gdc_wait
from meshserve.kernels.triton_attention import (
    _LOG2E,
    DecodeLaunch,
    _dot_precision,
    _fp8_tile,
    _is_fp8,
    _next_pow2,
    _upcast_dot,
    decode_split_attend,
    decode_split_tiles,
)
from meshserve.kernels.triton_attention_tile import dot_query
from meshserve.kernels.triton_kv_layout import v_offset
from meshserve.kernels.triton_ops import _norm_rope_heads, _rope_halves, _to_cache


@triton.jit
def _norm_rope_group(qkv_ptr, tok, stride_t, heads, row_valid, d, d_mask, w_ptr, eps, c, s,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr, dt: tl.constexpr):
    """q rows `heads` of token tok as [ROWS, BLOCK_D] (the layout of the attention tiles): _norm_rope_heads'
    math per element, the rotate-half partner loaded at d -+ HALF; c / s are the cos / sin row at d."""
    lo = d < HALF
    partner = tl.where(lo, d + HALF, d - HALF)
    mask = row_valid[:, None] & d_mask[None, :]
    row = qkv_ptr + tok * stride_t + heads[:, None] * HEAD_DIM
    x = tl.load(row + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        sq = x * x
        var = (tl.sum(tl.where(lo[None, :], sq, 0.0), 1) + tl.sum(tl.where(lo[None, :], 0.0, sq), 1)) / HEAD_DIM
        inv = (1.0 / tl.sqrt(var + eps))[:, None]
        w = tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        wp = tl.load(w_ptr + partner, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        x = (w * (x * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        xp = (wp * (xp * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    # first half: x1 * cos - x2 * sin; second half: x2 * cos + x1 * sin (each product rounded to dt first)
    rot = tl.where(lo[None, :], -xp, xp)
    o = (x * c[None, :]).to(dt).to(tl.float32) + (rot * s[None, :]).to(dt).to(tl.float32)
    return o.to(dt)


@triton.jit
def group_query(qkv_ptr, tok, stride_t, pos, cos_ptr, sin_ptr, stride_cos, stride_sin, qw_ptr, eps, kvh,
                GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                BLOCK_D: tl.constexpr, HAS_NORM: tl.constexpr, UPCAST_DOT: tl.constexpr, KV_FP8: tl.constexpr):
    """KV head kvh's GQA group of q rows of token tok, normed and rotated in the tiles' layout (cos / sin cast to
    q's dtype first), ready for the tile's dot -> (q, heads, row_valid, d, d_mask, c, s): c / s the cos / sin
    row at d, for the caller's K."""
    dt = qkv_ptr.dtype.element_ty
    rows = tl.arange(0, ROWS)
    row_valid = rows < GROUP
    heads = kvh * GROUP + rows
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=d_mask, other=0.0).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_sin + d, mask=d_mask, other=0.0).to(dt).to(tl.float32)
    q = _norm_rope_group(qkv_ptr, tok, stride_t, heads, row_valid, d, d_mask, qw_ptr, eps, c, s,
                         HEAD_DIM, HALF, HAS_NORM, dt)
    return dot_query(q, UPCAST_DOT, KV_FP8), heads, row_valid, d, d_mask, c, s


@triton.jit(do_not_specialize=["num_splits", "stride_btb"])  # see triton_attention._decode_split_kernel
def _decode_fused_split_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr,
    cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, ws_acc_ptr, ws_ml_ptr, ticket_ptr,
    eps, scale_log2, window, num_splits, k_scale, v_scale,
    stride_t, stride_cos, stride_sin,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_btb,
    stride_ot, stride_oh, stride_od,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_NORM: tl.constexpr, USE_WINDOW: tl.constexpr, DIRECT_OUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, USE_GDC: tl.constexpr = False,
    LAST_REDUCES: tl.constexpr = False, FP8_TILE: tl.constexpr = "convert", V_T: tl.constexpr = False,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    gdc_wait(USE_GDC)  # qkv is the projection's output, the metadata the step's inputs: wait before loads

    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if q_len != 1:  # a padding row (q_len 0): no token, nothing written (as the split kernel)
        return
    seq_len = tl.load(seq_lens_ptr + b)
    tok = q_start.to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    dt = qkv_ptr.dtype.element_ty
    q, heads, row_valid, d, d_mask, c, s = group_query(
        qkv_ptr, tok, stride_t, pos, cos_ptr, sin_ptr, stride_cos, stride_sin, qw_ptr, eps, kvh, GROUP, ROWS,
        HEAD_DIM, HALF, BLOCK_D, HAS_NORM, UPCAST_DOT, KV_FP8)

    # the current token's K/V: written by the split whose tiles hold position seq_len - 1 (split 0 when
    # seq_len is 0), before its tiles are read
    _, _, _, tile_lo, tile_hi, per_split = decode_split_tiles(seq_len, window, num_splits, split, USE_WINDOW,
                                                              BLOCK_N)
    writer = tl.maximum(tile_hi - 1 - tile_lo, 0) // tl.maximum(per_split, 1)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if (slot >= 0) & (split == writer):  # CUDA-graph padding (slot -1) writes nothing
        c1, c2, s1, s2 = _rope_halves(cos_ptr, sin_ptr, pos, stride_cos, stride_sin, HALF, BLOCK_HALF, dt)
        k1, k2, kh, kj, kmask = _norm_rope_heads(qkv_ptr, tok, stride_t, NUM_HEADS, kw_ptr, eps, c1, c2, s1, s2,
                                                 NUM_KV_HEADS, HALF, BLOCK_KH, BLOCK_HALF, HAS_NORM, dt)
        kmask = kmask & (kh[:, None] == kvh)  # this program's KV head only
        cdt = cache_ptr.dtype.element_ty
        dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs \
            + kh[:, None] * stride_ch + kj[None, :] * stride_cd
        tl.store(dst, _to_cache(k1, k_scale, cdt, KV_FP8), mask=kmask)
        tl.store(dst + HALF * stride_cd, _to_cache(k2, k_scale, cdt, KV_FP8), mask=kmask)
        v_src = qkv_ptr + tok * stride_t + (NUM_HEADS + NUM_KV_HEADS + kh[:, None]) * HEAD_DIM + kj[None, :]
        blk, off = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        for j in tl.static_range(2):  # the two rotary halves' features
            v_dst = cache_ptr + v_offset(blk, off, kh[:, None], kj[None, :] + j * HALF, stride_ckv, stride_cb,
                                         stride_cs, stride_ch, stride_cd, BLOCK_SIZE, V_T)
            tl.store(v_dst, _to_cache(tl.load(v_src + j * HALF, mask=kmask), v_scale, cdt, KV_FP8), mask=kmask)
    tl.debug_barrier()  # the CTA's K/V stores ordered before its tile loads read them back

    decode_split_attend(
        q, b, kvh, split, tok, seq_len, heads, row_valid, d, d_mask, cache_ptr, bt_ptr, out_ptr, ws_acc_ptr,
        ws_ml_ptr, ticket_ptr, scale_log2, window, num_splits, k_scale, v_scale,
        stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd, stride_btb, stride_ot, stride_oh, stride_od,
        NUM_HEADS, ROWS, BLOCK_D, BLOCK_SIZE, BLOCK_N, USE_WINDOW, DIRECT_OUT, DOT_PRECISION, KV_FP8, USE_GDC,
        LAST_REDUCES, FP8_TILE, V_T,
    )


def decode_attention_fused(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                           sin_cache: torch.Tensor, q_norm_weight: torch.Tensor | None,
                           k_norm_weight: torch.Tensor | None, eps: float, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, scale: float, sliding_window: int | None,
                           num_heads: int, num_kv_heads: int, num_splits: int, k_scale: float = 1.0,
                           v_scale: float = 1.0, inline_reduce: bool = False, num_warps: int = 4,
                           fp8_path: str = "convert") -> torch.Tensor:
    """triton_ops.qkv_rope_cache then triton_attention.decode_attention in one split kernel (+ the reduce
    kernel with splits, unless inline_reduce): qkv [T, (H + 2 Hkv) D] of one-token rows -> out [T, H, D].
    fp8_path: how an fp8 cache's tiles are read (as decode_attention's). No host syncs: safe to capture in a
    CUDA graph."""
    num_tokens = qkv.shape[0]
    head_dim, block_size = kv_cache.shape[-1], kv_cache.shape[2]
    if head_dim % 2 or cos_cache.shape[-1] != head_dim:
        raise ValueError("rotary needs an even head_dim equal to the cos/sin cache width")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos_cache = cos_cache if cos_cache.stride(-1) == 1 else cos_cache.contiguous()
    sin_cache = sin_cache if sin_cache.stride(-1) == 1 else sin_cache.contiguous()
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    plan = DecodeLaunch.make(qkv, num_heads, kv_cache, num_seqs, sliding_window, out, num_splits, None, num_warps,
                             inline_reduce)
    has_norm = q_norm_weight is not None
    _decode_fused_split_kernel[plan.grid](
        qkv, positions, cos_cache, sin_cache, q_norm_weight if has_norm else qkv,
        k_norm_weight if has_norm else qkv, slot_mapping,
        kv_cache, block_tables, seq_lens, query_start_loc, out, plan.ws_acc, plan.ws_ml, plan.tickets,
        float(eps), scale * _LOG2E, plan.window, plan.num_splits, float(k_scale), float(v_scale),
        qkv.stride(0), cos_cache.stride(0), sin_cache.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP=plan.group, ROWS=plan.rows,
        HEAD_DIM=head_dim, HALF=head_dim // 2, BLOCK_D=plan.block_d, BLOCK_KH=_next_pow2(num_kv_heads),
        BLOCK_HALF=_next_pow2(head_dim // 2), BLOCK_SIZE=block_size, BLOCK_N=plan.block_n,
        HAS_NORM=has_norm, USE_WINDOW=plan.use_window, DIRECT_OUT=plan.direct, UPCAST_DOT=_upcast_dot(qkv),
        DOT_PRECISION=_dot_precision(qkv), KV_FP8=_is_fp8(kv_cache), LAST_REDUCES=plan.inline,
        V_T=v_transposed(kv_cache),
        FP8_TILE=_fp8_tile(fp8_path, qkv, kv_cache), num_warps=num_warps, **plan.gdc,
    )
    plan.reduce(query_start_loc, out)
    return out
