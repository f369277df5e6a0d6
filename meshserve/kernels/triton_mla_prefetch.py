"""The MLA decode kernels' tile loop with the next KV tile's loads issued before the current tile's math
(PREFETCH=True of triton_mla._mla_decode_split_kernel and triton_mla_balanced._mla_balanced_kernel).

Why: Triton's pipeliner gives the plain loop (triton_mla.attend_latent_tile) ONE shared buffer whatever
num_stages (sm_90 TTGIR of the V2-Lite kernels, BLOCK_N 32, stages 2/3/4: memdesc<1x32x512>): the copy of tile
t + 1 starts only after tile t's dots have read the buffer and is awaited at the top of the next iteration, so
a program loads, then computes, then loads; only other programs on the SM hide the latency (1.0-2.3 TB/s of the
H200's 4.2 measured). Here the loop is pipelined by hand, in registers (launched with num_stages 1, the
pipeliner off): iteration t issues the global loads of tile t + 1 (into registers: the first use waits, not
the issue) and the block ids of tile t + 2, then runs tile t's dots, so each program keeps a tile in flight
while it computes. Costs the next tile's registers (BLOCK_N x 576 x 2 B over the threads: 72 a thread for
32 rows and 4 warps).

Same math as attend_latent_tile: the latent rows are the keys (with the rope part) and the values, fp32 online
softmax in log2 units. A tile past the program's range (t >= t_end) is not read (masked to zeros).
"""

from __future__ import annotations

import triton
import triton.language as tl

from meshserve.kernels.triton_attention_tile import online_softmax_step


@triton.jit
def _tile_blocks(t, t_end, seq_len, bt_row, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The cache block of each row of KV tile t ([BLOCK_N] int64; 0 where the row is not read)."""
    kv_pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
    # (a scalar bool & a tensor mask trips the interpreter: fold "t < t_end" into the length)
    kv_valid = kv_pos < tl.where(t < t_end, seq_len, 0)
    return tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)


@triton.jit
def _tile_rows(t, t_end, seq_len, blk, cache_ptr, r, r_mask, p, p_mask, stride_cb, stride_cs,
               RANK: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """(c [BLOCK_N, BLOCK_R], pe [BLOCK_N, BLOCK_P]) of KV tile t from its rows' blocks blk; zeros where not read."""
    kv_pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_valid = kv_pos < tl.where(t < t_end, seq_len, 0)
    row = cache_ptr + blk * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cs  # [BLOCK_N] row starts
    c = tl.load(row[:, None] + r[None, :], mask=kv_valid[:, None] & r_mask[None, :], other=0.0)
    pe = tl.load(row[:, None] + RANK + p[None, :], mask=kv_valid[:, None] & p_mask[None, :], other=0.0)
    return c, pe


@triton.jit
def attend_loaded_tile(ql, qp, acc, m_i, l_i, c, pe, t, seq_len, scale_log2, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """The math of one KV tile t of the latent cache on its rows already loaded (c: latent, pe: rope part):
    scores from ql . c and qp . pe, the online softmax step, the latent rows as values; shared with
    triton_mla.attend_latent_tile."""
    kv_valid = t * BLOCK_N + tl.arange(0, BLOCK_N) < seq_len
    c = c.to(ql.dtype)
    qk = tl.dot(ql, tl.trans(c), input_precision=DOT_PRECISION)
    qk += tl.dot(qp, tl.trans(pe.to(qp.dtype)), input_precision=DOT_PRECISION)
    qk = qk * scale_log2
    qk = tl.where(kv_valid[None, :], qk, float("-inf"))
    prob, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
    acc = acc * alpha[:, None] + tl.dot(prob.to(c.dtype), c, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def attend_latent_range_prefetched(
    ql, qp, acc, m_i, l_i, t0, t1, seq_len, bt_row, cache_ptr, r, r_mask, p, p_mask, scale_log2, stride_cb, stride_cs,
    RANK: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(acc, m_i, l_i) after KV tiles t0 .. t1 - 1 of one sequence, each tile's loads one iteration ahead."""
    blk = _tile_blocks(t0, t1, seq_len, bt_row, BLOCK_SIZE, BLOCK_N)
    c, pe = _tile_rows(t0, t1, seq_len, blk, cache_ptr, r, r_mask, p, p_mask, stride_cb, stride_cs,
                       RANK, BLOCK_SIZE, BLOCK_N)
    blk = _tile_blocks(t0 + 1, t1, seq_len, bt_row, BLOCK_SIZE, BLOCK_N)
    for t in range(t0, t1):
        c_next, pe_next = _tile_rows(t + 1, t1, seq_len, blk, cache_ptr, r, r_mask, p, p_mask, stride_cb, stride_cs,
                                     RANK, BLOCK_SIZE, BLOCK_N)
        blk = _tile_blocks(t + 2, t1, seq_len, bt_row, BLOCK_SIZE, BLOCK_N)
        acc, m_i, l_i = attend_loaded_tile(ql, qp, acc, m_i, l_i, c, pe, t, seq_len, scale_log2, BLOCK_N, DOT_PRECISION)
        c, pe = c_next, pe_next
    return acc, m_i, l_i
