"""MLA decode with the KV work balanced over a fixed number of programs (FlashMLA's scheduling, in Triton):
the semantics of kernels/mla_ref.mla_decode_ref for one query per sequence, like triton_mla.mla_decode.

Why: mla_decode gives each sequence the same number of splits, so at batch 256 with W2's contexts (100 to
2,048 tokens) one program streams 20x the latents of another and the step waits for the SMs that drew the
long ones. Here the batch's work is one line of cost units (each sequence: its KV tiles plus OVERHEAD units
for loading q and writing its result), cut into num_programs equal ranges; program p walks the sequences its
range overlaps, so every program streams about the same bytes whatever the lengths.

* ``_mla_balanced_kernel``: grid (num_programs, head blocks). Each program rebuilds the cost line from
  seq_lens (a vector cumsum over the batch, no host sync, CUDA-graph safe), finds its first sequence and walks
  on: per sequence, its share of the tiles through the same tile body as triton_mla (each latent tile loaded
  once, used as key and value by all heads of the block). A sequence covered by one program is written
  straight to the output; pieces of a sequence cut by a range boundary go to a workspace slot (at most 2 x
  num_programs pieces: each boundary cuts one sequence once) and program 0 writes each sequence's piece
  offset and count for the merge.
* ``_mla_balanced_merge_kernel``: grid (num_seqs, heads): merges a cut sequence's pieces; writes zeros for
  padding rows (seq_len 0) and nothing for sequences written directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.triton_attention import (
    _LOG2E,
    _NEG_BIG,
    _dot_precision,
    _next_pow2,
    _num_sms,
    _upcast_dot,
)
from meshserve.kernels.mla_decode_choice import BALANCED_STAGES, BALANCED_WARPS
from meshserve.kernels.triton_mla import BLOCK_H, _decode_config, attend_latent_range
from meshserve.kernels.triton_mla_pipelined import PIPELINED_TILE, pipelined_programs_per_sm

OVERHEAD = 2  # cost units of a sequence beyond its tiles: q in (18 KB), its result out (16-32 KB), ~1.5 tiles


@triton.jit
def _cost_line(seq_lens_ptr, qsl_ptr, num_seqs, num_programs, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
               OVERHEAD_UNITS: tl.constexpr):
    """Per sequence (vectors over the batch): tiles, cost, inclusive cumulative cost; and the range width."""
    bi = tl.arange(0, BLOCK_B)
    b_mask = bi < num_seqs
    lens = tl.load(seq_lens_ptr + bi, mask=b_mask, other=0).to(tl.int32)
    q_lo = tl.load(qsl_ptr + bi, mask=b_mask, other=0)
    q_hi = tl.load(qsl_ptr + bi + 1, mask=b_mask, other=0)
    tiles = tl.where(q_hi > q_lo, (lens + BLOCK_N - 1) // BLOCK_N, 0)
    cost = tl.where(tiles > 0, tiles + OVERHEAD_UNITS, 0)
    cum = tl.cumsum(cost, 0)
    total = tl.sum(cost, 0)
    width = tl.maximum((total + num_programs - 1) // num_programs, 1)
    return bi, tiles, cost, cum, width


@triton.jit(do_not_specialize=["num_seqs", "stride_btb"])  # see triton_attention._decode_split_kernel
def _mla_balanced_kernel(
    ql_ptr, qp_ptr, cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, ws_acc_ptr, ws_ml_ptr, pieces_ptr,
    scale_log2, num_seqs, num_programs,
    stride_qlt, stride_qlh, stride_qpt, stride_qph,
    stride_cb, stride_cs,
    stride_btb,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
    RANK: tl.constexpr, BLOCK_R: tl.constexpr, ROPE: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, OVERHEAD_UNITS: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, PREFETCH: tl.constexpr, TRANSPOSED: tl.constexpr,
    PIPELINED: tl.constexpr,
):
    p = tl.program_id(0)
    hb = tl.program_id(1)
    bi, tiles, cost, cum, width = _cost_line(seq_lens_ptr, qsl_ptr, num_seqs, num_programs, BLOCK_B, BLOCK_N,
                                             OVERHEAD_UNITS)
    # pieces: the programs whose ranges a sequence overlaps; cut sequences get consecutive workspace slots
    first_prog = (cum - cost) // width
    n_pieces = tl.where(cost > 0, (cum - 1) // width - first_prog + 1, 0)
    cut = tl.where(n_pieces > 1, n_pieces, 0)
    slot0 = tl.cumsum(cut, 0) - cut
    if (p == 0) & (hb == 0):
        tl.store(pieces_ptr + bi, slot0, mask=bi < num_seqs)
        tl.store(pieces_ptr + BLOCK_B + bi, n_pieces, mask=bi < num_seqs)

    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_valid = heads < NUM_HEADS
    r = tl.arange(0, BLOCK_R)
    r_mask = r < RANK
    pp = tl.arange(0, BLOCK_P)
    p_mask = pp < ROPE

    start = p * width
    end = tl.minimum(start + width, tl.sum(cost, 0))
    b = tl.sum((cum <= start).to(tl.int32), 0)  # the first sequence whose cost range reaches past start
    pos = start
    while pos < end:
        sel = bi == b
        c_hi = tl.sum(tl.where(sel, cum, 0), 0)
        c_lo = c_hi - tl.sum(tl.where(sel, cost, 0), 0)
        if c_hi > c_lo:  # zero-cost sequences (padding rows, seq_len 0) own no piece: skip them
            n_tiles = tl.sum(tl.where(sel, tiles, 0), 0)
            # this program's units of the sequence -> its tiles (the first OVERHEAD units carry none)
            t0 = tl.minimum(tl.maximum(pos - c_lo - OVERHEAD_UNITS, 0), n_tiles)
            t1 = tl.minimum(tl.maximum(tl.minimum(end, c_hi) - c_lo - OVERHEAD_UNITS, 0), n_tiles)
            seq_len = tl.load(seq_lens_ptr + b)
            tok = tl.load(qsl_ptr + b).to(tl.int64)
            ql = tl.load(ql_ptr + tok * stride_qlt + heads[:, None] * stride_qlh + r[None, :],
                         mask=h_valid[:, None] & r_mask[None, :], other=0.0)
            qp = tl.load(qp_ptr + tok * stride_qpt + heads[:, None] * stride_qph + pp[None, :],
                         mask=h_valid[:, None] & p_mask[None, :], other=0.0)
            if UPCAST_DOT:
                ql = ql.to(tl.float32)
                qp = qp.to(tl.float32)
            m_i = tl.full([BLOCK_H], _NEG_BIG, dtype=tl.float32)
            l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
            acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
            bt_row = bt_ptr + b.to(tl.int64) * stride_btb
            acc, m_i, l_i = attend_latent_range(
                ql, qp, acc, m_i, l_i, t0, t1, seq_len, bt_row, cache_ptr, r, r_mask, pp, p_mask, scale_log2,
                stride_cb, stride_cs, RANK, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, PREFETCH, TRANSPOSED, PIPELINED)
            pieces = tl.sum(tl.where(sel, n_pieces, 0), 0)
            if pieces == 1:
                o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
                tl.store(out_ptr + tok * stride_ot + heads[:, None] * stride_oh + r[None, :],
                         o.to(out_ptr.dtype.element_ty), mask=h_valid[:, None] & r_mask[None, :])
            else:
                k = tl.sum(tl.where(sel, slot0, 0), 0) + p - tl.sum(tl.where(sel, first_prog, 0), 0)
                ws_row = k.to(tl.int64) * NUM_HEADS + heads  # acc [slots, H, BLOCK_R], ml [slots, H, 2], fp32
                tl.store(ws_acc_ptr + ws_row[:, None] * BLOCK_R + r[None, :], acc, mask=h_valid[:, None])
                tl.store(ws_ml_ptr + ws_row * 2, m_i, mask=h_valid)
                tl.store(ws_ml_ptr + ws_row * 2 + 1, l_i, mask=h_valid)
        pos = c_hi
        b += 1


@triton.jit
def _mla_balanced_merge_kernel(
    ws_acc_ptr, ws_ml_ptr, pieces_ptr, qsl_ptr, out_ptr,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_start = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) == q_start:
        return  # no query row
    n = tl.load(pieces_ptr + BLOCK_B + b)
    if n == 1:
        return  # written directly
    slot0 = tl.load(pieces_ptr + b)
    r = tl.arange(0, BLOCK_R)
    m_run = tl.zeros([], dtype=tl.float32) + _NEG_BIG
    l_run = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k in range(n):  # n is 0 for a padding row (seq_len 0): zeros
        row = (slot0 + k).to(tl.int64) * NUM_HEADS + h
        m = tl.load(ws_ml_ptr + row * 2)
        l = tl.load(ws_ml_ptr + row * 2 + 1)
        m_new = tl.maximum(m_run, m)
        a_old = tl.exp2(m_run - m_new)
        a_new = tl.exp2(m - m_new)
        acc = acc * a_old + tl.load(ws_acc_ptr + row * BLOCK_R + r) * a_new
        l_run = l_run * a_old + l * a_new
        m_run = m_new
    o = acc / tl.where(l_run > 0, l_run, 1.0)
    tl.store(out_ptr + q_start.to(tl.int64) * stride_ot + h * stride_oh + r, o.to(out_ptr.dtype.element_ty),
             mask=r < RANK)


def mla_decode_balanced(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                        num_programs: int | None = None, tile: tuple[int, int, int] | None = None,
                        prefetch: bool = False, transposed: bool = False, pipelined: bool = False) -> torch.Tensor:
    """triton_mla.mla_decode's contract (one query per sequence; rows of q_len-0 sequences stay unwritten,
    those of seq_len-0 ones are zeros) with the work balanced over num_programs programs per head block
    (None: two per SM); tile (BLOCK_N, num_warps, num_stages), None: (32, 4, 2) for DeepSeek's latents. No host
    sync: safe to capture in a CUDA graph. prefetch: the tile loop that loads a tile ahead
    (kernels/triton_mla_prefetch.py; num_stages 1 unless tile says); transposed: the loop with the tile as the
    dots' M side (kernels/triton_mla_transposed.py; (64, 4, 2) unless tile says; over prefetch); pipelined:
    the loop with the block ids a tile ahead (kernels/triton_mla_pipelined.py; PIPELINED_TILE unless tile says,
    as many programs as fit on an SM together unless num_programs says; over both)."""
    num_tokens, num_heads, rank = q_lat.shape
    rope = q_pe.shape[2]
    out = torch.empty_like(q_lat)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    assert q_lat.stride(2) == 1 and q_pe.stride(2) == 1 and kv_cache.stride(4) == 1
    assert kv_cache.shape[-1] == rank + rope, "cache rows are [latent, rotary key]"
    block_r, block_p = max(16, _next_pow2(rank)), max(16, _next_pow2(rope))
    if pipelined:
        prefetch = transposed = False
        tile = tile or PIPELINED_TILE
    if transposed:
        prefetch = False
        tile = tile or (64, 4, 2)  # wgmma: M >= 64 for one warpgroup
    if tile is None:  # the swept best (kernels/mla_decode_choice.py): BLOCK_N as the split kernel's, 4 warps
        tile = (_decode_config(block_r, q_lat.element_size())[0], BALANCED_WARPS, 1 if prefetch else BALANCED_STAGES)
    block_n, num_warps, num_stages = tile
    if num_programs is None:  # every program resident: 2 an SM, or as many as the pipelined tile lets fit
        per_sm = pipelined_programs_per_sm(tile, BLOCK_H, block_r, block_p, kv_cache.element_size()) if pipelined else 2
        num_programs = per_sm * _num_sms(q_lat.device.index if q_lat.device.type == "cuda" else None)
    block_b = max(16, _next_pow2(num_seqs))
    dev = q_lat.device
    slots = 2 * num_programs
    ws_acc = torch.empty((slots, num_heads, block_r), dtype=torch.float32, device=dev)
    ws_ml = torch.empty((slots, num_heads, 2), dtype=torch.float32, device=dev)
    pieces = torch.empty((2, block_b), dtype=torch.int32, device=dev)
    _mla_balanced_kernel[(num_programs, triton.cdiv(num_heads, BLOCK_H))](
        q_lat, q_pe, kv_cache, block_tables, seq_lens, query_start_loc, out, ws_acc, ws_ml, pieces,
        scale * _LOG2E, num_seqs, num_programs,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(1), kv_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, BLOCK_H=BLOCK_H, RANK=rank, BLOCK_R=block_r, ROPE=rope, BLOCK_P=block_p,
        BLOCK_SIZE=kv_cache.shape[2], BLOCK_N=block_n, BLOCK_B=block_b, OVERHEAD_UNITS=OVERHEAD,
        UPCAST_DOT=_upcast_dot(q_lat), DOT_PRECISION=_dot_precision(q_lat), PREFETCH=prefetch,
        TRANSPOSED=transposed, PIPELINED=pipelined, num_warps=num_warps, num_stages=num_stages,
    )
    _mla_balanced_merge_kernel[(num_seqs, num_heads)](
        ws_acc, ws_ml, pieces, query_start_loc, out, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, RANK=rank, BLOCK_R=block_r, BLOCK_B=block_b, num_warps=4,
    )
    return out
