"""The MLA decode kernels' tile loop with the cache block ids read one tile ahead, so that Triton's pipeliner
keeps num_stages - 1 latent tiles in flight per program (PIPELINED=True of triton_mla._mla_decode_split_kernel
and triton_mla_balanced._mla_balanced_kernel; MESHSERVE_MLA_DECODE_KERNEL=pipelined).

Why: in the plain loop (triton_mla.attend_latent_tile) each tile's row addresses come from a block-table load
in the same iteration. The pipeliner then schedules that load, the tile's copy and the dots as a chain and
gives the tile ONE shared buffer whatever num_stages (sm_90 TTGIR, V2-Lite, BLOCK_N 32, stages 2/3/4:
memdesc<1x32x512>): the copy of tile t + 1 may start only after tile t's dots have read the buffer, so a
program loads, then computes, then loads, and at 2 programs an SM the H200 reads 2.3 TB/s of its 4.2.
Here the block ids of tile t + 1 are loaded in iteration t into a loop-carried register (L1/L2 hits: a few
bytes per 16-token page), so the tile's copy has only loop-carried inputs and the pipeliner issues it
num_stages - 1 iterations ahead into its own buffer (BLOCK_N 32, 3 stages: memdesc<2x32x512>, cp.async;
tools/mla_decode_sass.py prints the static facts old vs new).

Same math as attend_latent_tile (the latent rows are the keys, with the rope part, and the values; fp32 online
softmax in log2 units), so results match the plain loop's to the rounding of the dots.
"""

from __future__ import annotations

import triton
import triton.language as tl

from meshserve.kernels.triton_mla_prefetch import attend_loaded_tile

# (BLOCK_N, num_warps, num_stages) of the pipelined loop: 3 stages keep 2 tiles of 32 rows (72 KB) in flight
# per program, 94 KB of shared memory and <= 255 registers, so two programs share an SM
PIPELINED_TILE = (32, 4, 3)
_SMEM_PER_SM = 227 * 1024
_REGS_PER_SM = 65536


def pipelined_smem_bytes(block_n: int, num_stages: int, block_h: int, block_r: int, block_p: int,
                         elem_size: int) -> int:
    """Shared memory a program of the pipelined loop holds (an estimate from the TTGIR's buffers): num_stages - 1
    latent tiles, q_lat and q_pe, and the scores tile the PV dot reads."""
    tile = block_n * (block_r + block_p) * elem_size
    return max(1, num_stages - 1) * tile + block_h * (block_r + block_p) * elem_size + block_h * block_n * 4


def pipelined_programs_per_sm(tile: tuple[int, int, int], block_h: int, block_r: int, block_p: int,
                              elem_size: int) -> int:
    """Programs of the pipelined loop that fit on one SM together (shared memory, and registers at Triton's
    255 a thread for these wide accumulators): the balanced kernel launches that many per SM, all resident."""
    block_n, num_warps, num_stages = tile
    by_smem = _SMEM_PER_SM // pipelined_smem_bytes(block_n, num_stages, block_h, block_r, block_p, elem_size)
    by_regs = _REGS_PER_SM // (256 * 32 * num_warps)
    return max(1, min(by_smem, by_regs))


@triton.jit
def _tile_block_ids(t, seq_len, bt_row, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The cache block of each row of KV tile t ([BLOCK_N] int64; 0 past the sequence's end)."""
    kv_pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=kv_pos < seq_len, other=0).to(tl.int64)


@triton.jit
def attend_latent_range_pipelined(
    ql, qp, acc, m_i, l_i, t0, t1, seq_len, bt_row, cache_ptr, r, r_mask, p, p_mask, scale_log2, stride_cb, stride_cs,
    RANK: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(acc, m_i, l_i) after KV tiles t0 .. t1 - 1 of one sequence, the block ids one tile ahead."""
    blk = _tile_block_ids(t0, seq_len, bt_row, BLOCK_SIZE, BLOCK_N)
    for t in range(t0, t1):
        kv_pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_valid = kv_pos < seq_len
        row = cache_ptr + blk * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cs  # [BLOCK_N] row starts
        blk = _tile_block_ids(t + 1, seq_len, bt_row, BLOCK_SIZE, BLOCK_N)  # (at t1 - 1: ids the loop does not use)
        c = tl.load(row[:, None] + r[None, :], mask=kv_valid[:, None] & r_mask[None, :], other=0.0)
        pe = tl.load(row[:, None] + RANK + p[None, :], mask=kv_valid[:, None] & p_mask[None, :], other=0.0)
        acc, m_i, l_i = attend_loaded_tile(ql, qp, acc, m_i, l_i, c, pe, t, seq_len, scale_log2, BLOCK_N,
                                           DOT_PRECISION)
    return acc, m_i, l_i
