"""Triton paged attention: reshape-and-cache, prefill/mixed attention, and split-KV (flash-decoding) decode.

KV cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (index 0 is K, 1 is V), the
same as meshserve.kernels.attention_ref, which is the oracle these kernels are tested against.

Semantics (same as the reference): query j of a sequence with context length L (seq_lens, after this step)
and q_len new tokens sits at absolute position p = L - q_len + j and attends keys 0..p; with a sliding window
W only keys k > p - W.

Kernels
-------
* ``_reshape_and_cache_kernel``: grid (num_tokens,). Copies K and V rows [Hkv, D] of one token to its slot;
  slot < 0 (CUDA-graph padding) writes nothing. ``TritonAttentionBackend.write_qkv`` is the alternative
  cache write when the fused prologue is selected: triton_ops.qkv_rope_cache splits, norms and rotates q/k
  and writes K/V in the same kernel.
* ``_prefill_attention_kernel`` (max_query_len > 1: prefill chunks, mixed prefill + decode batches):
  grid (num_seqs, cdiv(max_query_len, BLOCK_Q), num_kv_heads). A program owns BLOCK_Q query tokens x all
  G = H / Hkv query heads of one KV head (ROWS = BLOCK_Q * G_PAD rows of the tile, row r = token r // G_PAD,
  head r % G_PAD), so each K/V tile is loaded once per GQA group. It walks KV tiles of BLOCK_N tokens
  (gathered through the block table, so any block_size works) from the sliding-window start up to the
  causal limit of its last query, with an fp32 online softmax (exp2, scale folded in): the tile step of
  triton_attention_tile.py, shared with the decode and unified kernels; with diag_mask_only (the default
  tiling, attention_tile_config) only the tiles crossing the diagonal or the window edge are masked.
  Programs take the last q-tiles (the longest walks) first; those past their sequence's query length exit
  at once.
  Graph-bound metadata (meta.graph_bound, a mixed step captured in a CUDA graph) and eager batches with
  decode rows go to triton_unified_attention.unified_attention instead, whose launch depends only on T, S
  and Hkv (by default a persistent kernel walking a per-step work list).
* ``_decode_split_kernel`` + ``_decode_reduce_kernel`` (max_query_len == 1): grid
  (num_seqs, num_kv_heads, num_splits). Each sequence's KV tiles (read from seq_lens on the device) are cut
  into num_splits contiguous ranges; a split writes its partial (max, sum, unnormalised acc) in fp32 to a
  workspace and the reduce kernel (grid (num_seqs, num_heads)) combines them. With num_splits == 1 the split
  kernel normalises and writes the output directly (no workspace, no reduce launch). With the inline reduce
  (MESHSERVE_DECODE_REDUCE=inline, opt-in until measured: issue 29's "decode attention without a separate
  reduce") there is no reduce launch either: each split takes a ticket on its (sequence, KV head) after writing
  its partial (a barrier, then an acq_rel atomic, as kernels/triton_moe_route_align.py), and the split that
  draws the last one combines the partials of its GQA group and leaves the ticket at zero for the next launch.
  The split kernel's body after its q load is ``decode_split_attend``, which triton_decode_fused.py's kernel
  shares: there each program builds q from the QKV projection and the split holding the current token writes
  its K/V first (``TritonAttentionBackend.attend_qkv``, MESHSERVE_DECODE_FUSED_PROLOGUE=1, opt-in).

CUDA graphs
-----------
The decode path does no host sync and makes no decision from device values: num_splits is a function of
host-known numbers only (num_seqs, num_kv_heads, meta.max_seq_len, SM count) and correctness does not depend
on it (each split computes its range from the device-side seq_len, empty splits contribute nothing). For
graph capture pass a fixed meta.max_seq_len (max_model_len, or a short-context bound: engine/cuda_graph.py
captures small batches once per bound whose decode_splits differ, and replays the one the step fits) or
construct the backend with ``decode_num_splits=N``; whatever num_splits is chosen at capture is baked into
the graph and stays valid for any seq_lens at replay (up to the block table width). Padding rows with
seq_len 0 produce zeros; rows with q_len 0 (query_start_loc[i+1] == query_start_loc[i]) write nothing.
Workspaces come from torch.empty (graph pool under capture).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from meshserve.kernels.attention_tile_config import (
    DECODE_SPLIT_TOKENS,
    LONG_PREFILL_TOKENS,
    AttentionTileConfig,
    clamp_block_q,
    default_tile_config,
)
from meshserve.kernels.kv_layout import v_transposed
from meshserve.kernels.pdl import gdc_kwargs
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait
from meshserve.kernels.tickets import MAX_TICKETS
from meshserve.kernels.tickets import ticket_workspace as _ticket_workspace
from meshserve.kernels.triton_attention_tile import attend_full_kv_tile, attend_paged_kv_tile, dot_query
from meshserve.kernels.triton_e4m3_words import FP8_PATHS, words_fit
from meshserve.kernels.triton_kv_layout import v_head_base, v_offset
from meshserve.kernels.triton_ops import qkv_rope_cache

_LOG2E = 1.4426950408889634
# running-max init: finite, so fully masked rows give exp2(-inf - big) = 0, never nan (a constexpr: compiled
# kernels may only read constexpr globals)
_NEG_BIG = tl.constexpr(-1.0e30)


# ----------------------------------------------------------------------------------------------------------
# reshape and cache
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr, k_scale, v_scale,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, KV_FP8: tl.constexpr,
    USE_GDC: tl.constexpr = False, V_T: tl.constexpr = False,
):
    """V_T: V stored as [Hkv, D, block_size] in each block (kernels/kv_layout.py)."""
    t = tl.program_id(0).to(tl.int64)
    gdc_wait(USE_GDC)  # before the early exit: every program waits (kernels/pdl.py)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=mask)
    gdc_trigger_late(USE_GDC)
    if KV_FP8:  # scale into e4m3's range, saturating like quant_ref.to_fp8 (IEEE division, as torch's)
        k = tl.clamp(tl.math.div_rn(k.to(tl.float32), k_scale), -448.0, 448.0)
        v = tl.clamp(tl.math.div_rn(v.to(tl.float32), v_scale), -448.0, 448.0)
    dst = cache_ptr + blk * stride_cb + off * stride_cs + h[:, None] * stride_ch + d[None, :] * stride_cd
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    v_dst = cache_ptr + v_offset(blk, off, h[:, None], d[None, :], stride_ckv, stride_cb, stride_cs, stride_ch,
                                 stride_cd, BLOCK_SIZE, V_T)
    tl.store(v_dst, v.to(cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter K and V [T, Hkv, D] into kv_cache [2, num_blocks, block_size, Hkv, D] at slot_mapping [T]
    (an fp8 cache gets K / k_scale and V / v_scale)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    block_size = kv_cache.shape[2]
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping, float(k_scale), float(v_scale),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, KV_FP8=_is_fp8(kv_cache), V_T=v_transposed(kv_cache),
        num_warps=4 if num_kv_heads * head_dim >= 512 else 1,
        **gdc_kwargs(key, programs=num_tokens, num_warps=4 if num_kv_heads * head_dim >= 512 else 1),
    )


# ----------------------------------------------------------------------------------------------------------
# prefill / mixed batches
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def attend_causal_q_tile(
    q_ptr, cache_ptr, bt_ptr, out_ptr, seq, kvh, q_start, q_len, q_tile_start, prefix,
    scale_log2, window, k_scale, v_scale,
    stride_qt, stride_qh, stride_qd, stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd, stride_btb,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    DIAG_MASK_ONLY: tl.constexpr, V_T: tl.constexpr,
):
    """One program's work in the prefill and unified kernels: the query tile starting at q_tile_start of a
    sequence (q_len new tokens from flat row q_start after prefix cached ones; block table row seq), its
    BLOCK_Q tokens x GROUP_PAD heads of KV head kvh (row r: token r // GROUP_PAD, head r % GROUP_PAD), attends
    causally (and within the window) to the paged KV cache and writes its output rows. DIAG_MASK_ONLY: the
    tiles every row sees whole (past the last query's window edge, up to the first query's position) skip
    the mask; only those crossing the diagonal or the window edge pay for it."""
    ROWS: tl.constexpr = BLOCK_Q * GROUP_PAD
    rows = tl.arange(0, ROWS)
    qi = q_tile_start + rows // GROUP_PAD
    g = rows % GROUP_PAD
    row_valid = (qi < q_len) & (g < GROUP)
    q_pos = prefix + qi
    heads = kvh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM

    tok = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=row_valid[:, None] & d_mask[None, :], other=0.0)
    q = dot_query(q, UPCAST_DOT, KV_FP8)

    m_i = tl.full([ROWS], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)

    # causal limit of the tile's last query, and the window start of its first
    kv_hi = prefix + tl.minimum(q_tile_start + BLOCK_Q, q_len)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(prefix + q_tile_start - window + 1, 0)
        kv_lo = (kv_lo // BLOCK_N) * BLOCK_N

    bt_row = bt_ptr + seq.to(tl.int64) * stride_btb
    k_base = cache_ptr + kvh * stride_ch
    v_base = v_head_base(cache_ptr, kvh, stride_ckv, stride_ch, BLOCK_SIZE, V_T)
    n_off = tl.arange(0, BLOCK_N)
    full_lo = kv_lo  # [full_lo, full_hi): whole tiles no row masks; the masked ones lie before and after
    full_hi = kv_lo
    if DIAG_MASK_ONLY:
        if USE_WINDOW:  # the last query's first visible key, rounded up to a tile edge
            edge = tl.maximum(kv_hi - window, 0)
            full_lo = kv_lo + tl.cdiv(tl.maximum(edge - kv_lo, 0), BLOCK_N) * BLOCK_N
        full_hi = tl.maximum(kv_lo + (prefix + q_tile_start + 1 - kv_lo) // BLOCK_N * BLOCK_N, full_lo)
        if USE_WINDOW:
            for start in range(kv_lo, full_lo, BLOCK_N):
                kv_pos = start + n_off
                acc, m_i, l_i = attend_paged_kv_tile(
                    q, q_pos, acc, m_i, l_i, kv_pos, kv_pos < kv_hi, window, bt_row, k_base, v_base, d, d_mask,
                    scale_log2, k_scale, v_scale, stride_cb, stride_cs, stride_cd,
                    BLOCK_SIZE, True, USE_WINDOW, KV_FP8, DOT_PRECISION, "convert", V_T,
                )
        for start in range(full_lo, full_hi, BLOCK_N):
            acc, m_i, l_i = attend_full_kv_tile(
                q, acc, m_i, l_i, start + n_off, bt_row, k_base, v_base, d, d_mask,
                scale_log2, k_scale, v_scale, stride_cb, stride_cs, stride_cd,
                BLOCK_SIZE, BLOCK_D == HEAD_DIM, KV_FP8, DOT_PRECISION, V_T,
            )
    for start in range(full_hi, kv_hi, BLOCK_N):
        kv_pos = start + n_off
        acc, m_i, l_i = attend_paged_kv_tile(
            q, q_pos, acc, m_i, l_i, kv_pos, kv_pos < kv_hi, window, bt_row, k_base, v_base, d, d_mask,
            scale_log2, k_scale, v_scale, stride_cb, stride_cs, stride_cd,
            BLOCK_SIZE, True, USE_WINDOW, KV_FP8, DOT_PRECISION, "convert", V_T,
        )

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["stride_btb"])  # see _decode_split_kernel
def _prefill_attention_kernel(
    q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
    scale_log2, window, k_scale, v_scale,
    stride_qt, stride_qh, stride_qd,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_btb,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    SKIP_SINGLE: tl.constexpr, DIAG_MASK_ONLY: tl.constexpr = False, V_T: tl.constexpr = False,
):
    b = tl.program_id(0)
    # the last q-tiles (the longest causal walks) first, so the short ones fill the tail of the launch
    qt = tl.num_programs(1) - 1 - tl.program_id(1)
    kvh = tl.program_id(2)

    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    q_tile_start = qt * BLOCK_Q
    if q_tile_start >= q_len:
        return
    if SKIP_SINGLE:  # noqa: SIM102 (Triton: a constexpr `and` a tensor does not compile)
        if q_len == 1:  # one-token rows of a mixed batch are the decode kernel's
            return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len

    attend_causal_q_tile(
        q_ptr, cache_ptr, bt_ptr, out_ptr, b, kvh, q_start, q_len, q_tile_start, prefix,
        scale_log2, window, k_scale, v_scale,
        stride_qt, stride_qh, stride_qd, stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd, stride_btb,
        stride_ot, stride_oh, stride_od,
        GROUP, GROUP_PAD, BLOCK_Q, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N,
        USE_WINDOW, UPCAST_DOT, DOT_PRECISION, KV_FP8, DIAG_MASK_ONLY, V_T,
    )


# ----------------------------------------------------------------------------------------------------------
# decode: split-KV + reduce
# ----------------------------------------------------------------------------------------------------------
# num_splits follows each eager step's longest context and stride_btb its widest block table: unspecialized, so
# a value of 1 or a multiple of 16 does not compile its own copy in the middle of serving
# (triton_unified_attention._unified_attention_kernel says more)
@triton.jit(do_not_specialize=["num_splits", "stride_btb"])
def _decode_split_kernel(
    q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, ws_acc_ptr, ws_ml_ptr, ticket_ptr,
    scale_log2, window, num_splits, k_scale, v_scale,
    stride_qt, stride_qh, stride_qd,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_btb,
    stride_ot, stride_oh, stride_od,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr, ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, DIRECT_OUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, USE_GDC: tl.constexpr = False,
    LAST_REDUCES: tl.constexpr = False, FP8_TILE: tl.constexpr = "convert", V_T: tl.constexpr = False,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    gdc_wait(USE_GDC)  # q comes from the prologue kernel, the metadata from the step's inputs: wait before loads

    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if q_len != 1:  # a padding row (q_len 0), or a prefill chunk of a mixed batch (the prefill kernel's)
        return
    seq_len = tl.load(seq_lens_ptr + b)

    rows = tl.arange(0, ROWS)
    row_valid = rows < GROUP
    heads = kvh * GROUP + rows
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    tok = q_start.to(tl.int64)
    q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=row_valid[:, None] & d_mask[None, :], other=0.0)
    q = dot_query(q, UPCAST_DOT, KV_FP8)

    decode_split_attend(
        q, b, kvh, split, tok, seq_len, heads, row_valid, d, d_mask, cache_ptr, bt_ptr, out_ptr, ws_acc_ptr,
        ws_ml_ptr, ticket_ptr, scale_log2, window, num_splits, k_scale, v_scale,
        stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd, stride_btb, stride_ot, stride_oh, stride_od,
        NUM_HEADS, ROWS, BLOCK_D, BLOCK_SIZE, BLOCK_N, USE_WINDOW, DIRECT_OUT, DOT_PRECISION, KV_FP8, USE_GDC,
        LAST_REDUCES, FP8_TILE, V_T,
    )


@triton.jit
def decode_split_tiles(seq_len, window, num_splits, split, USE_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """(kv_lo, t0, t1, tile_lo, tile_hi, per_split): the KV range a decode program walks, from the device-side
    sequence length: split `split` of the num_splits contiguous ranges of the visible tiles [tile_lo, tile_hi)
    (from the window start kv_lo), tiles [t0, t1) (empty past the end)."""
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(seq_len - window, 0)
    tile_lo = kv_lo // BLOCK_N
    tile_hi = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(tile_hi - tile_lo, num_splits)
    t0 = tile_lo + split * per_split
    t1 = tl.minimum(t0 + per_split, tile_hi)
    return kv_lo, t0, t1, tile_lo, tile_hi, per_split


@triton.jit
def decode_split_attend(
    q, b, kvh, split, tok, seq_len, heads, row_valid, d, d_mask, cache_ptr, bt_ptr, out_ptr, ws_acc_ptr,
    ws_ml_ptr, ticket_ptr, scale_log2, window, num_splits, k_scale, v_scale,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd, stride_btb, stride_ot, stride_oh, stride_od,
    NUM_HEADS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, DIRECT_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr, USE_GDC: tl.constexpr, LAST_REDUCES: tl.constexpr, FP8_TILE: tl.constexpr,
    V_T: tl.constexpr,
):
    """One decode program's work once its query rows q [ROWS, BLOCK_D] (dot_query'd; GQA group of KV head kvh,
    rows `heads`, flat token row tok) are in registers: its split's KV tiles, then the output (one split) or
    its partial in the workspace (and, LAST_REDUCES, the group's reduce by the last split). The body of
    _decode_split_kernel and of triton_decode_fused's kernel, which builds q from the QKV projection."""
    # this split's contiguous range of KV tiles, from the device-side sequence length
    _, t0, t1, _, _, _ = decode_split_tiles(seq_len, window, num_splits, split, USE_WINDOW, BLOCK_N)

    m_i = tl.full([ROWS], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)

    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    k_base = cache_ptr + kvh * stride_ch
    v_base = v_head_base(cache_ptr, kvh, stride_ckv, stride_ch, BLOCK_SIZE, V_T)
    n_off = tl.arange(0, BLOCK_N)
    # a window masks scores as a causal query at the last position would (keys >= seq_len - window, the tiles
    # from kv_lo's), not through kv_valid: kv_valid also masks the block-table load, and a transposed V tile
    # (load_v_transposed) wants every token of a cache block that holds a visible one to read that block
    q_last = tl.zeros([ROWS], dtype=tl.int32) + (seq_len - 1)
    for t in range(t0, t1):
        kv_pos = t * BLOCK_N + n_off
        acc, m_i, l_i = attend_paged_kv_tile(
            q, q_last, acc, m_i, l_i, kv_pos, kv_pos < seq_len, window, bt_row, k_base, v_base, d, d_mask,
            scale_log2, k_scale, v_scale, stride_cb, stride_cs, stride_cd,
            BLOCK_SIZE, USE_WINDOW, USE_WINDOW, KV_FP8, DOT_PRECISION, FP8_TILE, V_T,
        )
    gdc_trigger_late(USE_GDC)

    if DIRECT_OUT:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(out_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])
    else:
        # workspace: acc [B, H, S, BLOCK_D], ml [B, H, S, 2] (running max in log2 units, sum), fp32
        ws_row = (b.to(tl.int64) * NUM_HEADS + heads) * num_splits + split  # [ROWS]
        tl.store(ws_acc_ptr + ws_row[:, None] * BLOCK_D + d[None, :], acc, mask=row_valid[:, None])
        tl.store(ws_ml_ptr + ws_row * 2, m_i, mask=row_valid)
        tl.store(ws_ml_ptr + ws_row * 2 + 1, l_i, mask=row_valid)
        if LAST_REDUCES:
            # ticket_ptr: int32 [sequences x KV heads], zero on entry and on exit (the last split resets it)
            ticket_slot = ticket_ptr + b.to(tl.int64) * tl.num_programs(1) + kvh
            tl.debug_barrier()  # every lane's partial stored before the release below
            ticket = tl.atomic_add(ticket_slot, 1, sem="acq_rel", scope="gpu")
            if ticket == num_splits - 1:  # the last split of this group: every partial is visible (acquire)
                tl.debug_barrier()
                _reduce_group_partials(ws_acc_ptr, ws_ml_ptr, out_ptr, b, heads, row_valid, d, d_mask, tok,
                                       num_splits, stride_oh, stride_od, stride_ot, NUM_HEADS, ROWS, BLOCK_D)
                tl.store(ticket_slot, 0)


@triton.jit
def _reduce_group_partials(ws_acc_ptr, ws_ml_ptr, out_ptr, b, heads, row_valid, d, d_mask, tok, num_splits,
                           stride_oh, stride_od, stride_ot,
                           NUM_HEADS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The inline reduce: the splits' partials of one GQA group's rows combined as _decode_reduce_kernel does
    (the largest max first, then the weighted sums), one split at a time. Loads bypass L1 (.cg): the
    partials were written by programs on other SMs."""
    row0 = (b.to(tl.int64) * NUM_HEADS + heads) * num_splits  # [ROWS]: split 0's workspace row of each head
    m_max = tl.full([ROWS], _NEG_BIG, dtype=tl.float32)
    for s in range(num_splits):
        m_s = tl.load(ws_ml_ptr + (row0 + s) * 2, mask=row_valid, other=_NEG_BIG, cache_modifier=".cg")
        m_max = tl.maximum(m_max, m_s)
    l_tot = tl.zeros([ROWS], dtype=tl.float32)
    o = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for s in range(num_splits):
        m_s = tl.load(ws_ml_ptr + (row0 + s) * 2, mask=row_valid, other=_NEG_BIG, cache_modifier=".cg")
        l_s = tl.load(ws_ml_ptr + (row0 + s) * 2 + 1, mask=row_valid, other=0.0, cache_modifier=".cg")
        w = tl.where(row_valid, tl.exp2(m_s - m_max), 0.0)
        acc_s = tl.load(ws_acc_ptr + (row0 + s)[:, None] * BLOCK_D + d[None, :], mask=row_valid[:, None],
                        other=0.0, cache_modifier=".cg")
        l_tot += w * l_s
        o += acc_s * w[:, None]
    o = o / tl.where(l_tot > 0, l_tot, 1.0)[:, None]
    tl.store(out_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    ws_acc_ptr, ws_ml_ptr, qsl_ptr, out_ptr, num_splits,
    stride_ot, stride_oh, stride_od,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    gdc_wait(USE_GDC)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if q_len != 1:  # no split wrote this row (see _decode_split_kernel)
        return
    s = tl.arange(0, SPLITS_PAD)
    s_mask = s < num_splits
    d = tl.arange(0, BLOCK_D)
    row = (b.to(tl.int64) * NUM_HEADS + h) * num_splits + s
    m = tl.load(ws_ml_ptr + row * 2, mask=s_mask, other=_NEG_BIG)
    l = tl.load(ws_ml_ptr + row * 2 + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(s_mask, tl.exp2(m - m_max), 0.0)
    l_tot = tl.sum(w * l, 0)
    acc = tl.load(ws_acc_ptr + row[:, None] * BLOCK_D + d[None, :], mask=s_mask[:, None], other=0.0)
    gdc_trigger_late(USE_GDC)
    o = tl.sum(acc * w[:, None], 0)
    o = o / tl.where(l_tot > 0, l_tot, 1.0)
    tl.store(out_ptr + q_start.to(tl.int64) * stride_ot + h * stride_oh + d * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------
@functools.cache
def _num_sms(device_index: int | None) -> int:
    if not torch.cuda.is_available():
        return 8  # the interpreter: only the split heuristic reads this
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


# The Triton CPU interpreter computes tl.dot on bf16 operands wrongly (raw bits); there the kernels upcast
# q (and so k, v, p) to fp32. Compiled kernels always use the native 16-bit dot.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_precision(query: torch.Tensor) -> str:
    # fp32 models get true fp32 products (TF32 would break token equality with the reference path)
    return "ieee" if query.dtype == torch.float32 else "tf32"



def _is_fp8(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype == torch.float8_e4m3fn


def _upcast_dot(query: torch.Tensor) -> bool:
    return _INTERPRET and query.dtype == torch.bfloat16


def _fp8_tile(fp8_path: str, query: torch.Tensor, kv_cache: torch.Tensor) -> str:
    """The decode kernel's FP8_TILE for MESHSERVE_DECODE_FP8_PATH's value: "convert" for a 16-bit cache, the
    default path or a cache the words tile cannot read; "words_bytes" (no inline PTX) under the interpreter."""
    if fp8_path not in FP8_PATHS:
        raise ValueError(f"fp8_path takes one of {FP8_PATHS}, got {fp8_path!r}")
    if fp8_path == "convert" or not _is_fp8(kv_cache) or not words_fit(kv_cache):
        return "convert"
    return "words" if query.is_cuda and not _INTERPRET else "words_bytes"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _prefill_config(head_dim_pad: int, group_pad: int, max_query_len: int) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_N, num_warps) of the default mixed-step tile (attention_tile_config): ROWS =
    BLOCK_Q * group_pad is at least 16 (tl.dot) and at most 128; short query chunks get a smaller tile."""
    cfg = default_tile_config(head_dim_pad, group_pad, max_query_len)
    return cfg.block_q, cfg.block_n, cfg.num_warps


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, block_n: int,
                      num_sms: int, max_splits: int = 64, min_tokens_per_split: int = DECODE_SPLIT_TOKENS,
                      min_splits: int = 1) -> int:
    """Splits per (sequence, KV head) from host-known shapes only: when the batch alone leaves most SMs
    idle, enough programs to fill the GPU about twice; never splits shorter than min_tokens_per_split, except
    that such a grid over a context of at least min_splits tiles takes min_splits (one tile each at least); a
    power of two (few distinct workspace shapes)."""
    programs = max(1, num_seqs * num_kv_heads)
    # split only when the programs would leave most SMs idle: at one program per SM a single split already
    # streams at ~70% of the copy bandwidth, and the extra pass over the workspace costs more than it gains
    # (tools/sweep_decode_attention.py on an H100)
    want = -(-2 * num_sms // programs) if 2 * programs <= num_sms else 1
    seq_len = max(1, max_seq_len)
    by_len = max(1, -(-seq_len // max(block_n, min_tokens_per_split)))
    if want > 1:
        by_len = max(by_len, min(min_splits, -(-seq_len // block_n)))
    n = max(1, min(want, by_len, max_splits))
    return 1 << (n.bit_length() - 1)  # round down to a power of two


class TritonAttentionBackend:
    """The Triton attention backend (see the module docstring for the kernels and CUDA-graph rules).

    decode_num_splits: fixes the number of KV splits of decode attention (None: heuristic from
    num_seqs, num_kv_heads, meta.max_seq_len and the SM count). Any value is correct for any seq_lens.
    inline_reduce: decode's last split per (sequence, KV head) combines the partials instead of a reduce
    launch (MESHSERVE_DECODE_REDUCE=inline).
    fp8_path: how the decode kernel reads an fp8 cache (MESHSERVE_DECODE_FP8_PATH: "words", the default,
    triton_e4m3_words.py; "convert"; or "auto": words with the one tile, convert with the grid tile).
    balanced: programs an SM of the balanced kernel (kernels/triton_decode_balanced.py, MESHSERVE_DECODE_BALANCED)
    for decode grids of >= GRID_TILE_MIN_WAVES (sequence, KV head) programs an SM without a window; 0: the split
    kernel everywhere.
    split_tokens, min_splits: the heuristic's shortest split and its least splits of a short context in a grid
    that leaves SMs idle (decode_num_splits).
    """

    name = "triton"

    def __init__(self, decode_num_splits: int | None = None, max_decode_splits: int = 64,
                 inline_reduce: bool = False, grid_tile: str = "auto", fp8_path: str = "words",
                 grid_tile_shape: tuple[int, int, int] | None = None, balanced: int = 0,
                 split_tokens: int = DECODE_SPLIT_TOKENS, min_splits: int = 1):
        if fp8_path not in (*FP8_PATHS, "auto"):
            raise ValueError(f"fp8_path takes one of {(*FP8_PATHS, 'auto')}, got {fp8_path!r}")
        if grid_tile not in GRID_TILE_MODES:
            raise ValueError(f"grid_tile takes one of {GRID_TILE_MODES}, got {grid_tile!r}")
        self.decode_num_splits = decode_num_splits
        self.max_decode_splits = max_decode_splits
        self.inline_reduce = inline_reduce  # decode: the last split reduces (no reduce launch)
        self.grid_tile = grid_tile  # decode: which caches' large grids take decode_tile's smaller CTAs
        self.grid_tile_shape = grid_tile_shape or GRID_TILE  # (block_n, num_warps, num_stages) of those grids
        self.fp8_path = fp8_path  # decode over an fp8 cache: "convert", "words" or "auto" (_fp8_path_for)
        self.balanced = balanced  # programs an SM of the balanced kernel for large decode grids; 0: off
        self.split_tokens = split_tokens  # the heuristic's shortest split
        self.min_splits = min_splits  # ... and its least splits of a short context (two tiles or more)

    # -- cache write ---------------------------------------------------------------------------------
    def write_kv(self, key, value, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        reshape_and_cache(key, value, kv_cache, slot_mapping, k_scale, v_scale)

    def write_qkv(self, qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps, kv_cache,
                  slot_mapping, num_heads, num_kv_heads, k_scale=1.0, v_scale=1.0):
        """The fused prologue: split the QKV projection, RMSNorm q and k per head (when weights are given),
        rotate both, write K/V (an fp8 cache: K / k_scale, V / v_scale) to their slots in one kernel; returns
        q [T, H, D] (triton_ops.qkv_rope_cache)."""
        return qkv_rope_cache(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps, kv_cache,
                              slot_mapping, num_heads, num_kv_heads, k_scale, v_scale)

    # -- attention -----------------------------------------------------------------------------------
    def attend(self, query, kv_cache, meta, scale, sliding_window, k_scale=1.0, v_scale=1.0):
        num_tokens, num_heads, head_dim = query.shape
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
        if num_tokens == 0:
            return out
        if meta.max_query_len == 1:
            self._decode(query, kv_cache, meta, scale, sliding_window, out, k_scale, v_scale)
            return out
        # A mixed batch: its one-token rows (decodes) go to the decode kernel, which streams long contexts
        # at near copy bandwidth; in the prefill kernel each would be one latency-bound program per KV head
        # walking its whole context (2.5-4x slower on an H200, tools/mixed_step_probe.py). A captured graph
        # cannot know whether the replayed batch has any, so it always launches both.
        split = meta.graph_bound or meta.num_single_query_seqs > 0
        if split:
            self._decode(query, kv_cache, meta, scale, sliding_window, out, k_scale, v_scale)
        if split:
            # the prompts of a mixed batch: a launch fixed by (T, S, Hkv), not by this step's max_query_len,
            # which a captured graph needs; eager mixed steps too, where the prefill grid (S x q-tiles x Hkv)
            # would launch a program per decode row per q-tile that exits at once (200 decode rows beside a
            # 4k chunk: ~200k programs per layer for ~1k with work). Imported here: triton_unified_attention
            # imports this module's helpers.
            from meshserve.kernels.triton_unified_attention import (
                unified_attention,
                unified_config,
                unified_work,
            )

            config = unified_config(head_dim, num_heads // kv_cache.shape[3])
            work = unified_work(meta, num_tokens, config, True) if config.persistent else None
            unified_attention(query, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
                              sliding_window, out, k_scale, v_scale, skip_single=True, config=config, work=work)
        else:
            prefill_attention(query, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                              meta.max_query_len, scale, sliding_window, out, k_scale, v_scale)
        return out

    def attend_qkv(self, qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps, kv_cache, meta,
                   scale, sliding_window, num_heads, num_kv_heads, k_scale=1.0, v_scale=1.0):
        """write_qkv then attend in one decode launch (+ the reduce with splits): a decode-only step's qkv
        [T, (H + 2 Hkv) D] -> [T, H, D] (kernels/triton_decode_fused.py; MESHSERVE_DECODE_FUSED_PROLOGUE)."""
        if meta.max_query_len != 1:
            raise ValueError(f"attend_qkv serves decode-only steps, got max_query_len {meta.max_query_len}")
        from meshserve.kernels.triton_decode_fused import decode_attention_fused  # it imports this module

        splits = self.decode_splits(meta.seq_lens.shape[0], num_kv_heads, kv_cache.shape[-1], qkv.dtype,
                                    meta.max_seq_len, qkv.device)
        return decode_attention_fused(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps,
                                      kv_cache, meta.slot_mapping, meta.block_tables, meta.seq_lens,
                                      meta.query_start_loc, scale, sliding_window, num_heads, num_kv_heads, splits,
                                      k_scale, v_scale, inline_reduce=self.inline_reduce,
                                      fp8_path=self._fp8_path_for(grid_tile=False))

    def takes_grid_tile(self, kv_fp8: bool) -> bool:
        """Whether large decode grids over this cache take decode_tile's GRID_TILE: "auto" for fp8 caches only
        (H200 W2 Qwen3-0.6B, 2026-12-03, two processes each: fp8 cache 5.45 / 5.70 s against 5.87 / 6.03 s with
        the one tile; bf16 cache 6.06 / 5.78 s against 5.90 / 5.67 s: the bf16 kernel's -3.7% at batch 256 did
        not carry to W2), "grid" for every cache, "legacy" for none."""
        return self.grid_tile == "grid" or (self.grid_tile == "auto" and kv_fp8)

    def grid_tile_min_seqs(self, num_kv_heads: int, head_dim: int, device: torch.device,
                           kv_fp8: bool = False) -> int | None:
        """The smallest batch whose decode launch takes decode_tile's GRID_TILE or the balanced kernel (other
        compiled variants, which engine/eager_warmup.grid_tile_steps builds at start), or None where none does."""
        grid = self.takes_grid_tile(kv_fp8) and head_dim <= 128
        if device.type != "cuda" or not (grid or (self.balanced and head_dim <= BALANCED_MAX_HEAD_DIM)):
            return None
        return -(-GRID_TILE_MIN_WAVES * _num_sms(device.index) // num_kv_heads)

    def decode_splits(self, num_seqs: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      max_seq_len: int, device: torch.device) -> int:
        """The KV splits _decode uses for this batch shape (engine/cuda_graph.py keys graph variants by it)."""
        if self.decode_num_splits is not None:
            return self.decode_num_splits
        block_n = _decode_block_n(_next_pow2(head_dim), dtype.itemsize)
        return decode_num_splits(num_seqs, num_kv_heads, max_seq_len, block_n,
                                 _num_sms(device.index if device.type == "cuda" else None),
                                 max_splits=self.max_decode_splits, min_tokens_per_split=self.split_tokens,
                                 min_splits=self.min_splits)

    def _decode(self, query, kv_cache, meta, scale, sliding_window, out, k_scale, v_scale):
        """The one-token rows of the batch through the split-K decode kernel."""
        num_seqs, num_kv_heads = meta.seq_lens.shape[0], kv_cache.shape[3]
        block_n, num_warps, num_stages = None, 4, None
        if self.takes_grid_tile(_is_fp8(kv_cache)) and query.is_cuda:  # (the interpreter: only the sum order)
            block_n, num_warps, num_stages = decode_tile(num_seqs, num_kv_heads, query.shape[2],
                                                         _num_sms(query.device.index), self.grid_tile_shape)
        if self._takes_balanced(num_seqs, num_kv_heads, query.shape[2], sliding_window, query.device):
            from meshserve.kernels.triton_decode_balanced import decode_attention_balanced  # it imports this module

            # the grid tile for any cache: 2 warps, 37-39 KB of shared memory a program, 203-214 registers a
            # thread unbounded (4 an SM), capped at 168 for 5 or 6 (max_registers; the 128-token tile fits 3)
            tile = (block_n, num_warps, num_stages) if block_n is not None else self.grid_tile_shape
            decode_attention_balanced(query, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                      scale, out, tile, self.balanced, k_scale, v_scale,
                                      self._fp8_path_for(grid_tile=block_n is not None))
            return
        splits = self.decode_splits(num_seqs, num_kv_heads, query.shape[2], query.dtype, meta.max_seq_len,
                                    query.device)
        decode_attention(query, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                         scale, sliding_window, out, splits, block_n=block_n, num_warps=num_warps,
                         num_stages=num_stages, k_scale=k_scale, v_scale=v_scale, inline_reduce=self.inline_reduce,
                         fp8_path=self._fp8_path_for(grid_tile=block_n is not None))

    def _takes_balanced(self, num_seqs: int, num_kv_heads: int, head_dim: int, sliding_window,
                        device: torch.device) -> bool:
        """Whether a decode launch goes to the balanced kernel: switched on, no window, heads of at most
        BALANCED_MAX_HEAD_DIM, and a grid of at least GRID_TILE_MIN_WAVES (sequence, KV head) programs an SM (the
        grids decode_tile gives smaller CTAs; the interpreter's SM count is 8, so CPU tests reach it at 16
        programs)."""
        if not self.balanced or (sliding_window is not None and sliding_window > 0) or head_dim > BALANCED_MAX_HEAD_DIM:
            return False
        return num_seqs * num_kv_heads >= GRID_TILE_MIN_WAVES * _num_sms(device.index if device.type == "cuda"
                                                                          else None)

    def _fp8_path_for(self, grid_tile: bool) -> str:
        """The decode launch's fp8 path: "auto" reads words with the one (128-token, 4-warp) tile and converts
        with the grid tile, as each measured fastest (H200, 2026-12-03, sweep_decode_attention.py --fp8-ab:
        batch 16 words 55.2 vs convert 64.1 us; grid tile at batch 256 / 64 convert 207.8 / 106.5 vs words
        228.3 / 116.8, both with V in rows; opt-in: with V transposed words won W2 on the grid tile too)."""
        if self.fp8_path != "auto":
            return self.fp8_path
        return "convert" if grid_tile else "words"


def _decode_block_n(head_dim_pad: int, elem_size: int = 2) -> int:
    """KV tokens per tile of the decode kernel: 128 x 128-dim 16-bit rows measured best on an H100
    (96% of copy bandwidth at batch 256, context 1024); wider rows get fewer so 3 stages fit in smem."""
    row_bytes = head_dim_pad * elem_size
    return 128 if row_bytes <= 256 else 64 if row_bytes <= 512 else 32


# (block_n, num_warps, num_stages) of the decode kernel for grids of at least GRID_TILE_MIN_WAVES programs per SM
# (before splits, which only small grids get): smaller CTAs, more of them resident per SM. H200, one split, 8 KV
# heads, head_dim 128 (tools/probe_decode_tiles.py, 2026-12-03): batch 256 ctx 1024 bf16 271 -> 261 us, fp8 cache
# 258 -> 208 us; batch 64 ctx 2048 bf16 142 -> 138, fp8 133 -> 107. At batch 16 (128 programs) the default
# (128 tokens, 4 warps, 3 stages) holds: bf16 53.1 us, the best tile 52.7 (the same shape, 3 stages).
GRID_TILE = (64, 2, 2)
GRID_TILE_MIN_WAVES = 2
# the balanced kernel's heads: its tile (2 warps) and register cap were measured at head_dim 128 (Llama, Qwen); a
# 256-wide head holds twice the accumulator under the same cap, so wider heads keep the split kernel
BALANCED_MAX_HEAD_DIM = 128
GRID_TILE_MODES = ("auto", "grid", "legacy")  # TritonAttentionBackend.takes_grid_tile


def decode_tile(num_seqs: int, num_kv_heads: int, head_dim: int, num_sms: int,
                grid_tile: tuple[int, int, int] = GRID_TILE) -> tuple[int | None, int, int | None]:
    """(block_n, num_warps, num_stages) for decode_attention: grid_tile (GRID_TILE unless the selection says
    otherwise) where the (sequence, KV head) programs fill the GPU at least GRID_TILE_MIN_WAVES times and the
    head is at most 128 wide (the measured shapes), else the defaults (None: decode_attention's own)."""
    if num_seqs * num_kv_heads >= GRID_TILE_MIN_WAVES * num_sms and head_dim <= 128:
        return grid_tile
    return None, 4, None


def prefill_attention(query, kv_cache, block_tables, seq_lens, query_start_loc, max_query_len, scale,
                      sliding_window, out, k_scale: float = 1.0, v_scale: float = 1.0, skip_single: bool = False,
                      config: AttentionTileConfig | None = None):
    """Causal paged attention of a batch of query chunks (any q_len per sequence) into out [T, H, D].
    skip_single: leave sequences with one new token to decode_attention (a mixed batch's decode rows).
    config: the tiling (attention_tile_config; its persistent flag is the unified kernel's, unused here);
    None: the default for this max_query_len."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    group_pad = _next_pow2(group)
    block_d = max(16, _next_pow2(head_dim))
    if config is None:
        config = default_tile_config(block_d, group_pad, max_query_len, query.element_size(),
                                     long_prefill=max_query_len >= LONG_PREFILL_TOKENS)
    config = clamp_block_q(config, group_pad)
    block_q, block_n = config.block_q, config.block_n
    use_window = sliding_window is not None and sliding_window > 0
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _prefill_attention_kernel[grid](
        query, kv_cache, block_tables, seq_lens, query_start_loc, out,
        scale * _LOG2E, int(sliding_window) if use_window else 0, float(k_scale), float(v_scale),
        query.stride(0), query.stride(1), query.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        USE_WINDOW=use_window, UPCAST_DOT=_upcast_dot(query), DOT_PRECISION=_dot_precision(query),
        KV_FP8=_is_fp8(kv_cache), SKIP_SINGLE=skip_single, DIAG_MASK_ONLY=config.diag_mask_only,
        V_T=v_transposed(kv_cache),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def decode_attention(query, kv_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window, out,
                     num_splits: int, block_n: int | None = None, num_warps: int = 4,
                     num_stages: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
                     inline_reduce: bool = False, fp8_path: str = "convert"):
    """One query token per sequence (query_start_loc[i] is its row); sequences with q_len != 1 (padding,
    or a mixed batch's prefill chunks, which prefill_attention(skip_single=True) serves) write nothing.
    No host syncs: safe to capture in a CUDA graph. block_n / num_warps / num_stages are tuning knobs
    (tools/sweep_decode_attention.py); the defaults are the measured best. inline_reduce: with splits, the
    last split of each group combines the partials (no reduce launch; the module docstring). fp8_path: how an
    fp8 cache's tiles are read ("convert" or "words", _fp8_tile; a 16-bit cache ignores it)."""
    num_heads = query.shape[1]
    plan = DecodeLaunch.make(query, num_heads, kv_cache, seq_lens.shape[0], sliding_window, out, num_splits,
                             block_n, num_warps, inline_reduce)
    _decode_split_kernel[plan.grid](
        query, kv_cache, block_tables, seq_lens, query_start_loc, out, plan.ws_acc, plan.ws_ml, plan.tickets,
        scale * _LOG2E, plan.window, plan.num_splits, float(k_scale), float(v_scale),
        query.stride(0), query.stride(1), query.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        NUM_HEADS=num_heads, GROUP=plan.group, ROWS=plan.rows,
        HEAD_DIM=plan.head_dim, BLOCK_D=plan.block_d, BLOCK_SIZE=kv_cache.shape[2], BLOCK_N=plan.block_n,
        USE_WINDOW=plan.use_window, DIRECT_OUT=plan.direct, UPCAST_DOT=_upcast_dot(query),
        DOT_PRECISION=_dot_precision(query), KV_FP8=_is_fp8(kv_cache), LAST_REDUCES=plan.inline,
        FP8_TILE=_fp8_tile(fp8_path, query, kv_cache), V_T=v_transposed(kv_cache),
        num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}), **plan.gdc,
    )
    plan.reduce(query_start_loc, out)
    return out


@dataclasses.dataclass
class DecodeLaunch:
    """What a split-K decode launch derives from its shapes (decode_attention and triton_decode_fused share it):
    tile sizes, splits, the workspaces or the inline reduce's tickets, PDL's launch arguments (one decision
    for the split kernel and the reduce)."""

    grid: tuple[int, int, int]
    num_heads: int
    head_dim: int
    group: int
    rows: int
    block_d: int
    block_n: int
    num_splits: int
    use_window: bool
    window: int
    direct: bool
    inline: bool
    tickets: torch.Tensor
    ws_acc: torch.Tensor
    ws_ml: torch.Tensor
    gdc: dict

    @classmethod
    def make(cls, x: torch.Tensor, num_heads: int, kv_cache: torch.Tensor, num_seqs: int, sliding_window,
             out: torch.Tensor, num_splits: int, block_n: int | None, num_warps: int,
             inline_reduce: bool) -> DecodeLaunch:
        """x: the launch's activation (query or qkv: its dtype, element size and device)."""
        num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[-1]
        block_d = max(16, _next_pow2(head_dim))
        num_splits = max(1, int(num_splits))
        direct = num_splits == 1
        use_window = sliding_window is not None and sliding_window > 0
        inline = inline_reduce and not direct and num_seqs * num_kv_heads <= MAX_TICKETS
        if direct:
            ws_acc = ws_ml = out  # unused
        else:
            ws_acc = torch.empty((num_seqs, num_heads, num_splits, block_d), dtype=torch.float32, device=x.device)
            ws_ml = torch.empty((num_seqs, num_heads, num_splits, 2), dtype=torch.float32, device=x.device)
        return cls(
            grid=(num_seqs, num_kv_heads, num_splits), num_heads=num_heads, head_dim=head_dim,
            group=num_heads // num_kv_heads, rows=max(16, _next_pow2(num_heads // num_kv_heads)), block_d=block_d,
            block_n=block_n or _decode_block_n(block_d, x.element_size()), num_splits=num_splits,
            use_window=use_window, window=int(sliding_window) if use_window else 0, direct=direct, inline=inline,
            tickets=_ticket_workspace(x.device) if inline else out,  # unused unless inline
            ws_acc=ws_acc, ws_ml=ws_ml,
            # PDL (kernels/pdl.py): off unless the runner's selection turned it on
            gdc=gdc_kwargs(x, programs=num_seqs * num_kv_heads * num_splits, num_warps=num_warps),
        )

    def reduce(self, query_start_loc: torch.Tensor, out: torch.Tensor) -> None:
        """The reduce kernel over the split partials, where the split kernel did not finish the output itself
        (one split) or inline (the last split of each group)."""
        if self.direct or self.inline:
            return
        _decode_reduce_kernel[(self.grid[0], self.num_heads)](
            self.ws_acc, self.ws_ml, query_start_loc, out, self.num_splits,
            out.stride(0), out.stride(1), out.stride(2),
            NUM_HEADS=self.num_heads, HEAD_DIM=self.head_dim, BLOCK_D=self.block_d,
            SPLITS_PAD=_next_pow2(self.num_splits), num_warps=4 if self.block_d >= 128 else 2, **self.gdc,
        )
