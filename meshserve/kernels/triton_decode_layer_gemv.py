"""The one-launch decoder layer's dense GEMV phases (triton_decode_layer: qkv, o, gate_up, down) and the tiles
of every phase (phase_tiles, the kernel's R_* / K_* / P_* constexprs).

A phase is a grid-stride loop over row blocks, one stream of weight tiles a program across its blocks: 16-bit
weights here (triton_gemv._stream_rows' trips and sums, so its bits), fp8 words in triton_decode_layer_fp8, INT4
column blocks in triton_decode_layer_int4. Each program's first block's first columns, and the tile its stream
starts from, load before the barrier the phase waits on (_preload_w); a block's bias, residual and scales are
requested before its stream; gate_up blocks end in silu(gate) * up (ACT_OUT: _block_rows, _store_act).
"""

from __future__ import annotations

import triton
import triton.language as tl

from meshserve.kernels.triton_attention import _next_pow2
from meshserve.kernels.triton_decode_layer_fp8 import fp8_carry, fp8_rows, words_phase_tile
from meshserve.kernels.triton_decode_layer_int4 import (
    int4_cols,
    int4_first_tile,
    int4_phase_tile,
    int4_stage_x,
)
from meshserve.kernels.triton_gemv import _row_x
from meshserve.kernels.triton_ops import silu_mul


@triton.jit
def _block_rows(blk, N, BLOCK_R: tl.constexpr, ACT_OUT: tl.constexpr, HALVES: tl.constexpr):
    """The rows (INT4: output columns) of block blk of a GEMV phase over N, and their mask. ACT_OUT (gate_up,
    rows [gate | up]): BLOCK_R / 2 gate rows and their up rows, N / 2 further, so that the block ends in
    silu(gate) * up (_store_act); interleaved (gate i, up i), or for INT4's columns, whose loads want runs of
    contiguous columns, as two halves (gates, then ups)."""
    r = tl.arange(0, BLOCK_R)
    if ACT_OUT:
        HALF: tl.constexpr = BLOCK_R // 2
        if HALVES:
            pair, which = blk * HALF + r % HALF, r // HALF
        else:
            pair, which = blk * HALF + r // 2, r % 2
        return pair + which * (N // 2), pair < N // 2
    else:
        rows = blk * BLOCK_R + r
        return rows, rows < N


@triton.jit
def _store_act(y, y_ptr, blk, N, BLOCK_R: tl.constexpr, HALVES: tl.constexpr):
    """An ACT_OUT block's output (_block_rows): silu(gate) * up of its rounded gate and up rows, as
    silu_and_mul rounds them (the plain path's GEMV output, then its SiLU-and-mul), to y_ptr[pair]."""
    dt = y_ptr.dtype.element_ty
    y = y.to(dt).to(tl.float32)
    if HALVES:
        gate, up = tl.split(tl.permute(tl.reshape(y, [2, BLOCK_R // 2]), [1, 0]))
    else:
        gate, up = tl.split(tl.reshape(y, [BLOCK_R // 2, 2]))
    outs = blk * (BLOCK_R // 2) + tl.arange(0, BLOCK_R // 2)
    tl.store(y_ptr + outs, silu_mul(gate, up, dt), mask=outs < N // 2)


@triton.jit
def _tile_at(w_rows, rmask, K: tl.constexpr, K0: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns K0..K0 + BLOCK_K (masked at K) of the rows starting at w_rows ([BLOCK_R, 1] pointers)."""
    kk = K0 + tl.arange(0, BLOCK_K)
    return tl.load(w_rows + kk[None, :], mask=rmask[:, None] & (kk < K)[None, :], other=0)


@triton.jit
def _preload(w_ptr, N, K: tl.constexpr, pid, BLOCK_R: tl.constexpr, PRE_K: tl.constexpr,
             ACT_OUT: tl.constexpr = False):
    """The first PRE_K columns of this program's first row block: weights no phase writes, so they load before
    the barrier (or PDL's wait) that the phase's input waits on."""
    rows, rmask = _block_rows(pid, N, BLOCK_R, ACT_OUT, False)
    return _tile_at(w_ptr + rows[:, None].to(tl.int64) * K, rmask, K, 0, PRE_K)


@triton.jit
def _preload_w(w_ptr, s_ptr, z_ptr, N, K: tl.constexpr, pid, num_programs, BLOCK_R: tl.constexpr,
               BLOCK_K: tl.constexpr, PRE_K: tl.constexpr, W_FP8: tl.constexpr = False, W_INT4: tl.constexpr = False,
               GROUP: tl.constexpr = 1, ACT_OUT: tl.constexpr = False):
    """What a GEMV phase over the weight w_ptr ([N, K] 16-bit, fp8 words [N, K / 4], or INT4 words [K / 8, N])
    loads before its barrier: (the first block's first PRE_K columns (words), the tile its stream starts from:
    _first_stream_tile), or for INT4 its first trip (words, scales s_ptr and zeros z_ptr)."""
    if W_INT4:
        cols, cmask = _block_rows(pid, N, BLOCK_R, ACT_OUT, True)
        return int4_first_tile(w_ptr, s_ptr, z_ptr, N, K, cols, cmask, BLOCK_K, GROUP)
    else:
        KK: tl.constexpr = K // 4 if W_FP8 else K
        return (_preload(w_ptr, N, KK, pid, BLOCK_R, PRE_K, ACT_OUT),
                _first_stream_tile(w_ptr, N, KK, pid, num_programs, BLOCK_R, BLOCK_K, PRE_K, ACT_OUT))


@triton.jit
def _stream_carry(x_ptr, nw_ptr, inv_rms, w_rows, rmask, next_w_rows, next_rmask, K: tl.constexpr, w_first,
                  GATED: tl.constexpr, NORMED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                  FIRST: tl.constexpr):
    """(the [BLOCK_R, BLOCK_K] fp32 partial products of the rows (w_rows: their starts, [BLOCK_R, 1]) against the
    input row from column FIRST on, the next stream's first tile): triton_gemv._stream_rows' trips and sums (so
    its bits), from w_first (the tile at FIRST, already requested), each trip requesting the next tile before its
    products and the last one the first tile (columns 0..BLOCK_K) of the program's next rows (next_w_rows: the
    next block's, or the next expert's): without it each block's first tile was a round trip to memory with
    nothing in flight (one program an SM). A row of FIRST columns or fewer streams nothing and hands w_first on."""
    TRIPS: tl.constexpr = (K - FIRST + BLOCK_K - 1) // BLOCK_K
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    w = w_first
    if TRIPS > 0:
        for t in range(0, TRIPS - 1):
            kk = FIRST + t * BLOCK_K + ks
            kn = kk + BLOCK_K
            w_step = w
            w = tl.load(w_rows + kn[None, :], mask=rmask[:, None] & (kn < K)[None, :], other=0.0)
            acc += w_step.to(tl.float32) * _row_x(x_ptr, nw_ptr, inv_rms, kk, kk < K, K, GATED, NORMED)[None, :]
        kk = FIRST + (TRIPS - 1) * BLOCK_K + ks
        w_step = w
        w = _tile_at(next_w_rows, next_rmask, K, 0, BLOCK_K)
        acc += w_step.to(tl.float32) * _row_x(x_ptr, nw_ptr, inv_rms, kk, kk < K, K, GATED, NORMED)[None, :]
    return acc, w


@triton.jit
def _first_stream_tile(w_ptr, N, K: tl.constexpr, pid, num_programs, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRE_K: tl.constexpr, ACT_OUT: tl.constexpr):
    """The tile of K-wide rows (16-bit columns, or fp8 words) a 16-bit or fp8 phase's stream starts from: the
    program's first block's at PRE_K, or, when PRE_K covers the row, its next block's first."""
    if PRE_K < K:
        rows, rmask = _block_rows(pid, N, BLOCK_R, ACT_OUT, False)
        return _tile_at(w_ptr + rows[:, None].to(tl.int64) * K, rmask, K, PRE_K, BLOCK_K)
    else:
        rows, rmask = _block_rows(pid + num_programs, N, BLOCK_R, ACT_OUT, False)
        return _tile_at(w_ptr + rows[:, None].to(tl.int64) * K, rmask, K, 0, BLOCK_K)


@triton.jit
def _gemv_rows(x_ptr, nw_ptr, inv_rms, w_ptr, s_ptr, z_ptr, b_ptr, res_ptr, y_ptr, xs_ptr, N, K: tl.constexpr, blk,
               next_blk, w_pre, carry, GATED: tl.constexpr, NORMED: tl.constexpr, HAS_BIAS: tl.constexpr,
               RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRE_K: tl.constexpr,
               W_FP8: tl.constexpr, W_INT4: tl.constexpr, GROUP: tl.constexpr, ASM: tl.constexpr,
               ACT_OUT: tl.constexpr):
    """One row block: y = W x (+ bias), its first PRE_K columns from w_pre (already loaded) when PRE_K > 0 (the
    fold GEMV's order: the preloaded columns' sum, then the streamed tiles'); RESIDUAL: y rounded, plus the
    residual's rows, rounded again (the plain path's projection output, then rms_norm's residual add). W_FP8:
    w_ptr the fp8 weight as words and s_ptr its row scales, BLOCK_K / PRE_K in words (triton_decode_layer_fp8).
    W_INT4: w_ptr INT4 words [K / 8, N], s_ptr / z_ptr its GROUP-wise scales and zeros, the rows output columns,
    BLOCK_K groups a trip, PRE_K > 0: w_pre is the first trip's words, x staged at xs_ptr
    (triton_decode_layer_int4). ACT_OUT: the block's gate and up rows, its output silu(gate) * up (_block_rows).
    carry: the block's first streamed tile (INT4: trip), already requested; returns the program's next block's
    (next_blk), requested during this block's last trip.
    """
    dt = y_ptr.dtype.element_ty
    rows, rmask = _block_rows(blk, N, BLOCK_R, ACT_OUT, W_INT4)
    next_rows, next_rmask = _block_rows(next_blk, N, BLOCK_R, ACT_OUT, W_INT4)
    # the block's other inputs requested before its stream: read after it, each was a round trip to memory at
    # the block's end with nothing else in flight (one program an SM)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if RESIDUAL:
        res = tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if W_INT4:
        y, carry = int4_cols(xs_ptr, w_ptr, s_ptr, z_ptr, rows, rmask, next_rows, next_rmask, N, K, carry, GROUP,
                             BLOCK_R, BLOCK_K, ASM)
    elif W_FP8:
        y, carry = fp8_rows(x_ptr, nw_ptr, inv_rms, w_ptr, s_ptr, rows, rmask, next_rows, next_rmask, K, w_pre,
                            carry, GATED, NORMED, BLOCK_R, BLOCK_K, PRE_K, ASM)
    else:
        y = tl.zeros([BLOCK_R], dtype=tl.float32)
        if PRE_K > 0:
            kp = tl.arange(0, PRE_K)
            pmask = kp < K
            y += tl.sum(w_pre.to(tl.float32) * _row_x(x_ptr, nw_ptr, inv_rms, kp, pmask, K, GATED, NORMED)[None, :],
                        1)
        acc, carry = _stream_carry(x_ptr, nw_ptr, inv_rms, w_ptr + rows[:, None].to(tl.int64) * K, rmask,
                                   w_ptr + next_rows[:, None].to(tl.int64) * K, next_rmask, K, carry, GATED, NORMED,
                                   BLOCK_R, BLOCK_K, PRE_K)
        y += tl.sum(acc, 1)
    if HAS_BIAS:
        y += bias
    if ACT_OUT:
        _store_act(y, y_ptr, blk, N, BLOCK_R, W_INT4)
    else:
        if RESIDUAL:
            y = y.to(dt).to(tl.float32) + res
        tl.store(y_ptr + rows, y.to(dt), mask=rmask)
    return carry


@triton.jit
def _gemv_phase(x_ptr, nw_ptr, inv_rms, w_ptr, s_ptr, z_ptr, b_ptr, res_ptr, y_ptr, xs_ptr, N, K: tl.constexpr, pid,
                num_programs,
                w_pre, GATED: tl.constexpr, NORMED: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRE_K: tl.constexpr,
                W_FP8: tl.constexpr = False, W_INT4: tl.constexpr = False, GROUP: tl.constexpr = 1,
                ASM: tl.constexpr = False, ACT_OUT: tl.constexpr = False):
    """This program's row blocks pid, pid + num_programs, ...: the first with its preloaded columns (w_pre), one
    stream of tiles across them (each block's last trip requests the next block's first tile). INT4: x staged
    once to the program's scratch xs_ptr first (int4_stage_x), w_pre the first block's first trip."""
    if pid < tl.cdiv(N, BLOCK_R):
        if W_INT4:
            int4_stage_x(x_ptr, nw_ptr, inv_rms, xs_ptr, K, GROUP, GATED, NORMED, BLOCK_K * BLOCK_R // 16, ASM)
            pre, carry = w_pre, w_pre
        else:  # (_preload_w's)
            pre, carry = w_pre
            if W_FP8:
                carry = fp8_carry(x_ptr, nw_ptr, inv_rms, carry, K, PRE_K if PRE_K < K // 4 else 0, GATED, NORMED,
                                  BLOCK_K)
        carry = _gemv_rows(x_ptr, nw_ptr, inv_rms, w_ptr, s_ptr, z_ptr, b_ptr, res_ptr, y_ptr, xs_ptr, N, K, pid,
                           pid + num_programs, pre, carry, GATED, NORMED, HAS_BIAS, RESIDUAL, BLOCK_R, BLOCK_K, PRE_K,
                           W_FP8, W_INT4, GROUP, ASM, ACT_OUT)
        for blk in range(pid + num_programs, tl.cdiv(N, BLOCK_R), num_programs):
            carry = _gemv_rows(x_ptr, nw_ptr, inv_rms, w_ptr, s_ptr, z_ptr, b_ptr, res_ptr, y_ptr, xs_ptr, N, K, blk,
                               blk + num_programs, pre, carry, GATED, NORMED, HAS_BIAS, RESIDUAL, BLOCK_R, BLOCK_K, 0,
                               W_FP8, W_INT4, GROUP, ASM, ACT_OUT)


def gemv_phase_tile(n: int, k: int, programs: int, threads: int, values: int = 32) -> tuple[int, int, int]:
    """(rows a block, columns a streamed tile, columns preloaded) of a GEMV phase over n rows of k: the most rows
    a block (at most 16) that leave the busiest program within 10% of the fewest rows any block size gives (the
    o / down phases' 1,024 rows over 132 programs: 8, one block each; gate_up's 6,144: 16, three blocks each);
    ~`values` a thread a streamed tile (two tiles in flight: the bytes one program an SM keeps requested) and
    ~64 preloaded (the first block's whole row where it fits: 16 B x 8 in flight a thread before the barrier
    opens)."""
    def busiest(r: int) -> int:
        return -(-(-(-n // r)) // programs) * r

    fewest = min(busiest(r) for r in (16, 8, 4, 2, 1))
    rows = next(r for r in (16, 8, 4, 2, 1) if busiest(r) <= 1.1 * fewest)
    block_k = min(_next_pow2(k), max(64, values * threads // rows))
    pre_k = min(1 << (k.bit_length() - 1), max(64, 64 * threads // rows))  # a power of two <= k
    return rows, block_k, pre_k


def phase_tiles(qkv_n: int, q_dim: int, hidden: int, inter: int, top_k: int, router_n: int, moe: bool, fmt: str,
                group: int | None, programs: int, threads: int, values: int = 32) -> dict:
    """The kernel's R_* / K_* / P_* constexprs: each GEMV phase's tile (gemv_phase_tile; fp8: words_phase_tile;
    INT4: int4_phase_tile; the router is never quantized), gate_up's rows even (a block's gate rows and their up
    rows), and in a MoE layer one expert's rows a gate_up block and nothing preloaded past the routing."""
    tiles = {}
    for name, n, k in (("QKV", qkv_n, hidden), ("O", hidden, q_dim), ("GU", top_k * 2 * inter, hidden),
                       ("D", hidden, inter), ("RT", router_n, hidden)):
        tile = gemv_phase_tile(n, k, programs, threads, values)
        if fmt == "fp8" and name != "RT":
            tile = words_phase_tile(*tile, k)
        elif fmt == "int4" and name != "RT":
            tile = int4_phase_tile(n, k, group, programs, threads, values)
        tiles[f"R_{name}"], tiles[f"K_{name}"], tiles[f"P_{name}"] = tile
    tiles["R_GU"] = max(tiles["R_GU"], 2)
    if moe:
        while (2 * inter) % tiles["R_GU"]:
            tiles["R_GU"] //= 2
        tiles["P_GU"] = tiles["P_D"] = 0
    return tiles
