"""Decode attention with the attention prologue inside it: one launch fewer per layer in decode-only steps.

The two-step path of a decode step is triton_ops.qkv_rope_cache (split the QKV projection's output, RMSNorm q
and k per head when the model has q_norm / k_norm, rotate both, write K/V to the cache, return q) and then
triton_attention.decode_attention. ``_decode_fused_split_kernel`` does both in the decode split kernel's grid
(num_seqs, num_kv_heads, num_splits):

* every program builds its GQA group's q rows straight from qkv (over the group's rows, GROUP_PAD, then
  repeated to the dot's 16): the same per-element math and roundings as triton_ops._norm_rope_heads, with the
  variance summed over the two halves as there;
* the program of the split that holds the sequence's last position (seq_len - 1, the current token; split 0
  when seq_len is 0) owns the token: it builds only its own KV head's k (norm + rotary, the same math) and v,
  rounds them as the cache stores them (_to_cache: bf16, or fp8 with k_scale / v_scale) and writes them to
  slot_mapping[token] for the next steps, so each (sequence, KV head) is written exactly once. It never reads
  them back: the split's KV tiles (triton_attention.decode_split_walk) stop before position seq_len - 1, and the
  token's score q . k and value v are folded into the online softmax from registers after the tiles (scaled
  and rounded as a tile's dot sees the stored bytes). No program of the launch reads the slot being written
  (a row's slot is its position seq_len - 1, engine/step_inputs.py), so no barrier orders anything, and the
  tiles start right after q's prologue: the k/v loads are issued with q's, and each program's first tiles
  are prefetched into L2 (PREFETCH_TILES) before that prologue. The output equals the two-step path's up to
  the summation order (the token is summed last, not inside its tile); the cache bytes are the prologue's.

Padding rows (q_len != 1) exit at once as in the split kernel; a slot < 0 writes nothing; seq_len 0 (CUDA-graph
padding) attends to nothing (zeros), and a slot >= 0 there is still written, by split 0. No host decision
from device values; the splits, the reduce (kernel or inline) and PDL are the split kernel's.

Selected by MESHSERVE_DECODE_FUSED_PROLOGUE=1 (layers/backend_selection.py), used by Attention.forward_qkv in
decode-only steps through TritonAttentionBackend.attend_qkv. Reference: write_qkv then attend (the two-step
path), which tests/kernels/test_triton_decode_fused.py compares it with: cache bytes exact, outputs to a
summation-order tolerance. tools/decode_fused_sass.py: its sm_90 registers and SASS beside the plain kernel's.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait
from meshserve.kernels.triton_attention import (
    _INTERPRET,
    _LOG2E,
    DecodeLaunch,
    _dot_precision,
    _is_fp8,
    _next_pow2,
    _upcast_dot,
    decode_split_finish,
    decode_split_tiles,
    decode_split_walk,
)
from meshserve.kernels.triton_attention_tile import dot_query
from meshserve.kernels.triton_ops import _to_cache

# tiles of each program's range prefetched into L2 before its q prologue (the loop's software pipeline keeps two
# in flight, num_stages 3); MESHSERVE_DECODE_FUSED_PREFETCH=0 turns it off for A/Bs (tools/w1_ab_device.sh). No
# inline PTX in the interpreter.
PREFETCH_TILES = int(os.environ.get("MESHSERVE_DECODE_FUSED_PREFETCH", "2"))


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
def _norm_rope_row(x, xp, w, wp, lo, eps, c, s, HEAD_DIM: tl.constexpr, HAS_NORM: tl.constexpr, dt: tl.constexpr):
    """_norm_rope_group's math for one head as a [BLOCK_D] row (the current token's k), from its loaded values:
    x (the head), xp (its rotate-half partners at d -+ HALF), the norm weights w / wp at d and at the partners,
    lo = d < HALF, the cos / sin rows c / s."""
    x = x.to(tl.float32)
    xp = xp.to(tl.float32)
    if HAS_NORM:
        sq = x * x
        var = (tl.sum(tl.where(lo, sq, 0.0), 0) + tl.sum(tl.where(lo, 0.0, sq), 0)) / HEAD_DIM
        inv = 1.0 / tl.sqrt(var + eps)
        x = (w.to(tl.float32) * (x * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        xp = (wp.to(tl.float32) * (xp * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    rot = tl.where(lo, -xp, xp)
    o = (x * c).to(dt).to(tl.float32) + (rot * s).to(dt).to(tl.float32)
    return o.to(dt)


@triton.jit
def _prefetch_first_tiles(cache_ptr, bt_row, kvh, t0, t1, kv_lo, kv_end, stride_ckv, stride_cb, stride_cs, stride_ch,
                          stride_cd, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                          TILES: tl.constexpr, LINE: tl.constexpr, USE_WINDOW: tl.constexpr):
    """prefetch.global.L2 of the K and V rows (every 128-byte line: LINE elements) of tiles t0 .. t0 + TILES - 1
    (those before t1): issued before q's prologue, so that the tiles' loads, which wait for q, find them in L2
    rather than in HBM."""
    n = tl.arange(0, BLOCK_N)
    NUM_LINES: tl.constexpr = (HEAD_DIM + LINE - 1) // LINE
    lines = tl.arange(0, NUM_LINES) * LINE
    for i in tl.static_range(TILES):
        kv_pos = (t0 + i) * BLOCK_N + n
        valid = (kv_pos < kv_end) & (t0 + i < t1)
        if USE_WINDOW:
            valid = valid & (kv_pos >= kv_lo)
        blk = tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        k = cache_ptr + kvh * stride_ch + (blk * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cs)[:, None] \
            + lines[None, :] * stride_cd
        on = tl.broadcast_to(valid[:, None], k.shape).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p prefetch.global.L2 [$1]; @p prefetch.global.L2 [$2]; "
            "mov.u32 $0, 0; }",
            "=r,l,l,r", [k, k + stride_ckv, on], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit(do_not_specialize=["num_splits", "stride_btb"])  # see triton_attention._decode_split_kernel
def _decode_fused_split_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr,
    cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, ws_acc_ptr, ws_ml_ptr, ticket_ptr,
    eps, scale_log2, window, num_splits, k_scale, v_scale,
    stride_t, stride_cos, stride_sin,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_btb,
    stride_ot, stride_oh, stride_od,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_NORM: tl.constexpr, USE_WINDOW: tl.constexpr, DIRECT_OUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, USE_GDC: tl.constexpr = False,
    LAST_REDUCES: tl.constexpr = False, PREFETCH_TILES: tl.constexpr = 0, PREFETCH_LINE: tl.constexpr = 64,
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
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    dt = qkv_ptr.dtype.element_ty
    cdt = cache_ptr.dtype.element_ty

    # the split whose tiles hold the current token (position seq_len - 1; split 0 when seq_len is 0) owns it
    kv_lo, t0, t1, tile_lo, tile_hi, per_split = decode_split_tiles(seq_len, window, num_splits, split, USE_WINDOW,
                                                                    BLOCK_N)
    own = split == tl.maximum(tile_hi - 1 - tile_lo, 0) // tl.maximum(per_split, 1)

    rows = tl.arange(0, ROWS)
    row_valid = rows < GROUP
    heads = kvh * GROUP + rows
    grp = tl.arange(0, GROUP_PAD)  # q's rows while it is built: the group alone, not the dot's ROWS
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    # the current token's k / v row of this KV head, loaded by its owner only (the others' masked off): issued
    # with q's loads
    own_d = d < tl.where(own, HEAD_DIM, 0)  # (a comparison: the interpreter rejects a mask `&` a scalar)
    lo = d < HALF
    partner = tl.where(lo, d + HALF, d - HALF)
    k_row = qkv_ptr + tok * stride_t + (NUM_HEADS + kvh) * HEAD_DIM
    kx = tl.load(k_row + d, mask=own_d, other=0.0)
    kxp = tl.load(k_row + partner, mask=own_d, other=0.0)
    kw = kx
    kwp = kxp
    if HAS_NORM:
        kw = tl.load(kw_ptr + d, mask=own_d, other=0.0)
        kwp = tl.load(kw_ptr + partner, mask=own_d, other=0.0)
    v = tl.load(k_row + NUM_KV_HEADS * HEAD_DIM + d, mask=own_d, other=0.0)
    t1 = tl.minimum(t1, tl.cdiv(seq_len - 1, BLOCK_N))  # the last tile only if it holds more than the token
    if PREFETCH_TILES > 0:
        _prefetch_first_tiles(cache_ptr, bt_ptr + b.to(tl.int64) * stride_btb, kvh, t0, t1, kv_lo, seq_len - 1,
                              stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
                              PREFETCH_TILES, PREFETCH_LINE, USE_WINDOW)
    # q: this group's rows, normed and rotated, in the tiles' layout (cos / sin cast to q's dtype first)
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=d_mask, other=0.0).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_sin + d, mask=d_mask, other=0.0).to(dt).to(tl.float32)
    q = _norm_rope_group(qkv_ptr, tok, stride_t, kvh * GROUP + grp, grp < GROUP, d, d_mask, qw_ptr, eps, c, s,
                         HEAD_DIM, HALF, HAS_NORM, dt)
    q = dot_query(q, UPCAST_DOT, KV_FP8)  # [GROUP_PAD, BLOCK_D]

    # the current token (its owner only): this KV head's k normed and rotated as the prologue kernel does, k / v
    # written to the cache for the next steps (a slot < 0, CUDA-graph padding, writes nothing; nothing in this
    # launch reads that slot, so no barrier) and used as stored (an fp8 cache: quantized, then through the
    # tiles' own conversion and scales). Its score now, while q is in a plain layout: across the tiles only a
    # [ROWS] vector and v stay live, not q or k (three CTAs per SM need <= 168 registers)
    v = _to_cache(v, v_scale, cdt, KV_FP8)
    k = _to_cache(_norm_rope_row(kx, kxp, kw, kwp, lo, eps, c, s, HEAD_DIM, HAS_NORM, dt), k_scale, cdt, KV_FP8)
    write = d < tl.where(own & (slot >= 0), HEAD_DIM, 0)
    dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kvh * stride_ch \
        + d * stride_cd
    tl.store(dst, k, mask=write)
    tl.store(dst + stride_ckv, v, mask=write)
    s_new = tl.sum(q.to(tl.float32) * k.to(q.dtype).to(tl.float32)[None, :], 1)
    if KV_FP8:
        s_new = s_new * (scale_log2 * k_scale)
    else:
        s_new = s_new * scale_log2
    # q and its scores to the dot's ROWS (the group's rows repeated, then the copies zeroed / masked)
    q = tl.reshape(tl.broadcast_to(q[None, :, :], (ROWS // GROUP_PAD, GROUP_PAD, BLOCK_D)), (ROWS, BLOCK_D))
    q = tl.where(row_valid[:, None], q, 0.0).to(q.dtype)
    s_new = tl.reshape(tl.broadcast_to(s_new[None, :], (ROWS // GROUP_PAD, GROUP_PAD)), (ROWS,))
    s_new = tl.where(rows < tl.where(own & (seq_len > 0), GROUP, 0), s_new, float("-inf"))

    # the split's tiles before the current token, then the token folded into the online softmax
    acc, m_i, l_i = decode_split_walk(q, b, kvh, t0, t1, kv_lo, seq_len - 1, d, d_mask, cache_ptr, bt_ptr,
                                      scale_log2, window, k_scale, v_scale, stride_ckv, stride_cb, stride_cs,
                                      stride_ch, stride_cd, stride_btb, ROWS, BLOCK_D, BLOCK_SIZE, BLOCK_N,
                                      USE_WINDOW, DOT_PRECISION, KV_FP8)
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s_new - m_new)  # 0 where s_new is -inf: other splits, padding rows, seq_len 0
    l_i = l_i * alpha + p
    pv = p.to(q.dtype).to(tl.float32)[:, None] * v.to(q.dtype).to(tl.float32)[None, :]
    if KV_FP8:  # V / v_scale in the cache, as the tiles scale their P.V product
        pv = pv * v_scale
    acc = acc * alpha[:, None] + pv
    gdc_trigger_late(USE_GDC)

    decode_split_finish(acc, m_new, l_i, b, kvh, split, tok, heads, row_valid, d, d_mask, out_ptr, ws_acc_ptr,
                        ws_ml_ptr, ticket_ptr, num_splits, stride_ot, stride_oh, stride_od, NUM_HEADS, ROWS, BLOCK_D,
                        DIRECT_OUT, LAST_REDUCES)


def decode_attention_fused(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                           sin_cache: torch.Tensor, q_norm_weight: torch.Tensor | None,
                           k_norm_weight: torch.Tensor | None, eps: float, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, scale: float, sliding_window: int | None,
                           num_heads: int, num_kv_heads: int, num_splits: int, k_scale: float = 1.0,
                           v_scale: float = 1.0, inline_reduce: bool = False, num_warps: int = 4) -> torch.Tensor:
    """triton_ops.qkv_rope_cache then triton_attention.decode_attention in one split kernel (+ the reduce
    kernel with splits, unless inline_reduce): qkv [T, (H + 2 Hkv) D] of one-token rows -> out [T, H, D].
    No host syncs: safe to capture in a CUDA graph."""
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
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP=plan.group, GROUP_PAD=_next_pow2(plan.group),
        ROWS=plan.rows,
        HEAD_DIM=head_dim, HALF=head_dim // 2, BLOCK_D=plan.block_d, BLOCK_SIZE=block_size, BLOCK_N=plan.block_n,
        HAS_NORM=has_norm, USE_WINDOW=plan.use_window, DIRECT_OUT=plan.direct, UPCAST_DOT=_upcast_dot(qkv),
        DOT_PRECISION=_dot_precision(qkv), KV_FP8=_is_fp8(kv_cache), LAST_REDUCES=plan.inline,
        PREFETCH_TILES=0 if _INTERPRET else PREFETCH_TILES, PREFETCH_LINE=128 // kv_cache.element_size(),
        num_warps=num_warps, **plan.gdc,
    )
    plan.reduce(query_start_loc, out)
    return out
