"""The MLA decode kernels' tile loop with the cache block ids read one tile ahead, so that Triton's pipeliner
keeps num_stages - 1 latent tiles in flight per program (PIPELINED=True of triton_mla._mla_decode_split_kernel
and triton_mla_balanced._mla_balanced_kernel; MESHSERVE_MLA_DECODE_KERNEL=pipelined).

Why: in the plain loop (triton_mla.attend_latent_tile) each tile's row addresses come from a block-table load
in the same iteration. The pipeliner then schedules that load, the tile's copy and the dots as a chain and
gives the tile ONE shared buffer whatever num_stages (sm_90 TTGIR, V2-Lite, BLOCK_N 32, stages 2/3/4:
memdesc<1x32x512>): the copy of tile t + 1 may start only after tile t's dots have read the buffer, so a
program loads, then computes, then loads, and at 2 programs an SM the H200 reads 2.3 TB/s of its 4.2.
Here the row addresses of tile t + 1 (its block-table load and the address math) are made in iteration t
into a loop-carried register (block ids are L1/L2 hits: 8 B per 16-token page), so the tile's copy has only
loop-carried inputs and the pipeliner issues it num_stages - 1 iterations ahead into its own buffer.

Static facts (tools/mla_decode_sass.py, sm_90, the balanced kernel, V2-Lite, per warp and 32-row tile):
  plain     (32, 4, 2): 1 buffer, 56 KB shared, 253 registers, 840 loop instructions, 18 cp.async + 18
            block-id loads, 72 ldmatrix, 68 mma.sync
  pipelined (32, 4, 3): 2 buffers, 93 KB, 255 registers (24 B stack, none in the loop), 810 instructions,
            the same loads and MMAs: two programs an SM keep 2 x 36 KB ahead of their dots, where the plain
            loop keeps none (only the other program's load overlaps a program's math)
The tile is still loaded once (cp.async into shared memory) and read twice from there (ldmatrix: as the
scores' B operand and as the PV's), plus q_lat each tile (the A operand: no registers left to keep it).

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
def _tile_rows(t, seq_len, bt_row, cache_ptr, stride_cb, stride_cs, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The start of each cached row of KV tile t ([BLOCK_N] pointers; block 0 past the sequence's end)."""
    kv_pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
    blk = tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=kv_pos < seq_len, other=0).to(tl.int64)
    return cache_ptr + blk * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cs


@triton.jit
def attend_latent_range_pipelined(
    ql, qp, acc, m_i, l_i, t0, t1, seq_len, bt_row, cache_ptr, r, r_mask, p, p_mask, scale_log2, stride_cb, stride_cs,
    RANK: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(acc, m_i, l_i) after KV tiles t0 .. t1 - 1 of one sequence, the rows' addresses one tile ahead."""
    seq_len = seq_len.to(tl.int32)  # (an int64 length makes every row's mask a 64-bit compare)
    row = _tile_rows(t0, seq_len, bt_row, cache_ptr, stride_cb, stride_cs, BLOCK_SIZE, BLOCK_N)
    for t in range(t0, t1):
        kv_valid = t * BLOCK_N + tl.arange(0, BLOCK_N) < seq_len
        c = tl.load(row[:, None] + r[None, :], mask=kv_valid[:, None] & r_mask[None, :], other=0.0)
        pe = tl.load(row[:, None] + RANK + p[None, :], mask=kv_valid[:, None] & p_mask[None, :], other=0.0)
        # (at t1 - 1: addresses the loop does not use)
        row = _tile_rows(t + 1, seq_len, bt_row, cache_ptr, stride_cb, stride_cs, BLOCK_SIZE, BLOCK_N)
        acc, m_i, l_i = attend_loaded_tile(ql, qp, acc, m_i, l_i, c, pe, t, seq_len, scale_log2, BLOCK_N,
                                           DOT_PRECISION)
    return acc, m_i, l_i
