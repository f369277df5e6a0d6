"""The MLA decode kernels' tile loop in the transposed orientation (TRANSPOSED=True of
triton_mla._mla_decode_split_kernel and triton_mla_balanced._mla_balanced_kernel): scores^T = c q_lat^T
[BLOCK_N, heads] and out^T += c^T p^T [R, heads], so the KV tile is the dots' M side.

Why: the plain loop's dots (q_lat [16, R] x c^T) have 16 rows, below Hopper's wgmma (M >= 64 a warpgroup), so
Triton emits mma.sync with warps split over columns: every warp holds all of q_lat as its A operand (16 x 512
bf16 = 128 registers a thread), 253 in all at 4 warps (sm_90 ptxas), two programs an SM. Transposed, with
BLOCK_N >= 64 both dots can take wgmma with their operands in shared memory (the latent tile as A, K-major for
the scores and M-major for the output; q_lat^T and p^T as B), the accumulator out^T [R, 16] fp32 is 64
registers a thread, and the tile's bytes per program are 2x (64 rows: 72 KB a tile).

Same math as attend_latent_tile (fp32 online softmax in log2 units, latent rows as keys and values); acc comes
in and goes out as [heads, R] (transposed once a range).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_latent_range_transposed(
    ql, qp, acc, m_i, l_i, t0, t1, seq_len, bt_row, cache_ptr, r, r_mask, p, p_mask, scale_log2, stride_cb, stride_cs,
    RANK: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(acc [BLOCK_H, BLOCK_R], m_i, l_i) after KV tiles t0 .. t1 - 1 of one sequence, computed transposed."""
    ql_t = tl.trans(ql)  # [BLOCK_R, BLOCK_H]
    qp_t = tl.trans(qp)
    acc_t = tl.trans(acc)  # [BLOCK_R, BLOCK_H]
    for t in range(t0, t1):
        kv_pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_valid = kv_pos < seq_len
        blk = tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
        row = cache_ptr + blk * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cs  # [BLOCK_N] row starts
        c = tl.load(row[:, None] + r[None, :], mask=kv_valid[:, None] & r_mask[None, :], other=0.0).to(ql.dtype)
        pe = tl.load(row[:, None] + RANK + p[None, :], mask=kv_valid[:, None] & p_mask[None, :], other=0.0)
        s_t = tl.dot(c, ql_t, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_H]
        s_t += tl.dot(pe.to(qp.dtype), qp_t, input_precision=DOT_PRECISION)
        s_t = tl.where(kv_valid[:, None], s_t * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_t, 0))
        alpha = tl.exp2(m_i - m_new)
        p_t = tl.exp2(s_t - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p_t, 0)
        acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(c), p_t.to(c.dtype), input_precision=DOT_PRECISION)
        m_i = m_new
    return tl.trans(acc_t), m_i, l_i
