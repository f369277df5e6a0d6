"""A whole decoder layer in one launch at batch 1: its steps as phases of one persistent grid, a grid barrier
between phases where the plain path has a kernel boundary (opt-in; dense Llama-family layers, their projections
16-bit, fp8 with a scale a row or group-wise INT4, and sparse 16-bit ones with softmax top-k routing).

Why: W1 Qwen3-0.6B runs ~31 us a layer against 7.4 us of weight bytes (BENCHMARKS.md, twenty-third session),
in six launches (four fold GEMVs, the prologue, attention): what is left is the boundaries; Qwen3-30B-A3B ~57 us
a layer against ~27 us of active bytes in about eight. A barrier inside
one launch costs an atomic and a spin on L2 where a boundary costs the grid's drain and the next one's start.
The phases, every intermediate rounded where the plain path rounds it:
  0  qkv = W_qkv rms_norm(h)                  every program norms the whole row itself (1-2 K values)
  1  per KV head and KV split: q / k RMSNorm + rotary, the token's K / V to the cache, attention over the
     split's tiles, the last split to finish merging (triton_decode_fused's prologue, the split kernel's walk
     and inline reduce; up to MAX_ATTN_SPLITS a KV head)
  2  h2 = h + W_o attn
  3  (MoE layers) router logits = W_r rms_norm(h2)
  4  act = silu(gate) * up of gate_up = W_gu rms_norm(h2): a block takes gate rows and their up rows and ends
     in the activation (the plain path's ACT_OUT GEMV); MoE: every program routes the token itself from the
     logits (softmax top-k, triton_moe_routing._route_row: the same bits in each) and the rows are the chosen
     experts' w13 rows, each expert's act
  5  out = h2 + W_down act; MoE: each chosen expert's w2 rows against its act, its output rounded, scaled by
     its routing weight and summed in fp32 (kernels/moe_ref's order), the load counter counting the choices
Each GEMV phase is a grid-stride loop over row blocks in triton_gemv._stream_rows' K order (so its sums; fp8
weights: the words GEMV's products, triton_decode_layer_fp8; INT4: column blocks over the whole K,
triton_decode_layer_int4), one stream of tiles a program: each trip requests the next tile before its products
and a block's last trip the program's next block's first (_stream_carry), and each block's bias, residual and
scales are requested before its stream; with one program an SM nothing else would be in flight while a block
waited for its first tile. Each program's first block's first columns, and the tile its stream starts from, load
before the barrier the phase waits on (before PDL's wait for the QKV phase; o_proj's after the program's
attention work): weights stream while the previous phase and the barrier finish (gemv_phase_tile). The input h
is the whole residual stream and so is the output (the norm fold's convention, layers/norm_fold.py): the
residual add happens in phases 2 and 4.

The barrier (``_grid_barrier``): each program's threads meet (bar.sync), one thread adds 1 to the phase's int32
counter with release semantics and spins on it with acquire until every program has arrived. The counters are
zero when the launch starts (the caller zeroes a step's counters once, inside the decode graph) and one counter
serves one boundary of one layer, so nothing is reused within a step. Data another program wrote in an earlier
phase is read after the acquire (the PTX model's release / acquire pattern, bar.sync carrying it to the CTA's
other threads, as cooperative groups' grid sync) and each buffer is written once a launch.

It needs every program resident at once: the grid is programs_per_sm x SMs at a register cap that fits them
(triton_decode_balanced.max_registers), and the launch checks the compiled kernel's shared memory against the
SM's before it runs; a grid that cannot be one wave raises instead of hanging.

The interpreter runs programs one after another, where a barrier would wait forever: there (and with
one_launch=False) each phase is its own launch of the same kernel (PHASE_LO == PHASE_HI), the CPU tests' path;
a single launch of every phase is the GPU's. Reference: decode_layer_ref (the plain path's ops composed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from meshserve.kernels.kv_layout import v_transposed
from meshserve.kernels.pdl import gdc_kwargs, interpreting
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait
from meshserve.kernels.quant_ref import FP8_DTYPE
from meshserve.kernels.triton_attention import (
    _LOG2E,
    _dot_precision,
    _fp8_tile,
    _is_fp8,
    _next_pow2,
    _num_sms,
    _upcast_dot,
    decode_split_attend,
    decode_split_tiles,
)
from meshserve.kernels.triton_decode_balanced import max_registers
from meshserve.kernels.triton_decode_fused import _norm_rope_group, group_query
from meshserve.kernels.triton_decode_layer_fp8 import fp8_carry, fp8_rows, words_phase_tile
from meshserve.kernels.triton_decode_layer_int4 import (
    int4_cols,
    int4_first_tile,
    int4_group_fits,
    int4_phase_tile,
    int4_scratch_words,
    int4_stage_x,
)
from meshserve.kernels.triton_gemv import _row_x
from meshserve.kernels.triton_kv_layout import v_offset
from meshserve.kernels.triton_moe_routing import _route_row
from meshserve.kernels.tickets import ticket_workspace, tickets_usable
from meshserve.kernels.triton_ops import _to_cache, silu_mul

NUM_PHASES = 6  # 3 (the router) only in MoE layers
BARRIERS_PER_LAYER = NUM_PHASES - 1
# a program's timing record (decode_layer(timing=...)): clock64 at its start [0], after PDL's wait [1], on arriving at
# and leaving barrier k [2 + 2k, 3 + 2k], at its end [12]; globaltimer (ns) at its start [13] and end [14]
TIMING_SLOTS = 16
SMEM_PER_SM = 228 * 1024  # sm_90: what its programs' shared memory may add up to (the L1 carve-out's maximum)
MAX_WARPS_PER_SM = 64
# KV tokens a tile in the attention phase: 128 (the split kernel's) took 255 registers a thread and spilled 280 B
# at 8 warps (one stage, q and K built in the same program); 64 takes 211-228 and none (sm_90, static)
ATTENTION_BLOCK_N = 64
MAX_ATTN_SPLITS = 8


@triton.jit
def _clock():
    """The SM's cycle counter (%clock64: durations within one program)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _globaltimer():
    """The GPU's nanosecond timer (%globaltimer: one clock for every SM)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _grid_barrier(bar_ptr, num_programs, t_ptr, SLOT: tl.constexpr, TIMING: tl.constexpr):
    """Wait until all num_programs programs reached this counter (zero before the launch). TIMING: the program's
    cycle counter on arriving and on leaving, to t_ptr[2 + 2 SLOT] and t_ptr[3 + 2 SLOT] (TIMING_SLOTS)."""
    tl.debug_barrier()  # every thread's stores of the phase issued before the release below
    if TIMING:
        tl.store(t_ptr + 2 + 2 * SLOT, _clock())
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")  # scalar atomics: one thread issues them
    while tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu") < num_programs:
        pass
    tl.debug_barrier()  # the acquire ordered before every thread's loads of the next phase
    if TIMING:
        tl.store(t_ptr + 3 + 2 * SLOT, _clock())


@triton.jit
def _inv_rms(h_ptr, K, eps, BLOCK_H: tl.constexpr):
    """1 / rms of the row h [K] in fp32: _residual_rms_kernel's statistics (rms_norm's)."""
    cols = tl.arange(0, BLOCK_H)
    hf = tl.load(h_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / K + eps)


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


@triton.jit
def _expert_of(ids, slots, slot):
    """ids[slot] of the routing's [BLOCK_TOPK] vector, as a scalar."""
    return tl.sum(tl.where(slots == slot, ids, 0), 0)


@triton.jit
def _expert_rows(w_ptr, ids, slots, slot, rows, ROW_ELEMS: tl.constexpr, K: tl.constexpr):
    """[BLOCK_R, 1] starts of the rows of the expert in routing slot `slot` (a slot past TOP_K: expert 0's, for a
    stream that is masked off) in the experts' weights w_ptr [E, ROW_ELEMS / K, K]."""
    expert = _expert_of(ids, slots, slot).to(tl.int64)
    return w_ptr + expert * ROW_ELEMS + rows[:, None].to(tl.int64) * K


@triton.jit
def _moe_gate_up_phase(h2_ptr, ln2_ptr, inv_rms, w13_ptr, gu_ptr, ids, slots, pid, num_programs,
                       HIDDEN: tl.constexpr, INTER: tl.constexpr, TOP_K: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """act [TOP_K, INTER] = silu(gate) * up of each chosen expert's w13 rms_norm(h2): row blocks over the TOP_K
    experts' rows (BLOCK_R divides 2 INTER: a block is one expert's), each block its gate rows and their up rows
    (_block_rows' ACT_OUT), rounded as the plain path's per-expert GEMM and then its SiLU-and-mul; one stream of
    tiles a program across its blocks (_stream_carry)."""
    BPE: tl.constexpr = 2 * INTER // BLOCK_R  # blocks an expert
    NB: tl.constexpr = TOP_K * BPE
    if pid < NB:
        rows, rmask = _block_rows(pid % BPE, 2 * INTER, BLOCK_R, True, False)
        carry = _tile_at(_expert_rows(w13_ptr, ids, slots, pid // BPE, rows, 2 * INTER * HIDDEN, HIDDEN), rmask,
                         HIDDEN, 0, BLOCK_K)
        for blk in range(pid, NB, num_programs):
            rows, rmask = _block_rows(blk % BPE, 2 * INTER, BLOCK_R, True, False)
            w_rows = _expert_rows(w13_ptr, ids, slots, blk // BPE, rows, 2 * INTER * HIDDEN, HIDDEN)
            nxt = blk + num_programs
            next_rows, next_rmask = _block_rows(nxt % BPE, 2 * INTER, BLOCK_R, True, False)
            next_w_rows = _expert_rows(w13_ptr, ids, slots, nxt // BPE, next_rows, 2 * INTER * HIDDEN, HIDDEN)
            next_rmask = next_rmask & (next_rows * 0 + nxt < NB)
            acc, carry = _stream_carry(h2_ptr, ln2_ptr, inv_rms, w_rows, rmask, next_w_rows, next_rmask, HIDDEN, carry,
                                       False, True, BLOCK_R, BLOCK_K, 0)
            _store_act(tl.sum(acc, 1), gu_ptr + (blk // BPE) * INTER, blk % BPE, 2 * INTER, BLOCK_R, False)


@triton.jit
def _moe_down_first(w2_ptr, ids, slots, pid, HIDDEN: tl.constexpr, INTER: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """The down phase's first tile (its first block's first expert's): the experts are known from the routing on,
    so it loads before the phase's barrier."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    return _tile_at(_expert_rows(w2_ptr, ids, slots, 0, rows, HIDDEN * INTER, INTER), rows < HIDDEN, INTER, 0,
                    BLOCK_K)


@triton.jit
def _moe_down_phase(gu_ptr, w2_ptr, res_ptr, out_ptr, ids, weights, slots, pid, num_programs, carry,
                    HIDDEN: tl.constexpr, INTER: tl.constexpr, TOP_K: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """out = h2 + sum over the chosen experts of weight x w2 act (silu(gate) * up, _moe_gate_up_phase's), as
    kernels/moe_ref sums them: each expert's output rounded, scaled and added in fp32, the sum rounded, then the
    residual add rounded; one stream of tiles a program across its blocks' experts from carry (_moe_down_first;
    each expert's last trip requests the next expert's first tile, the last expert's the next block's first
    expert's)."""
    dt = out_ptr.dtype.element_ty
    NB: tl.constexpr = (HIDDEN + BLOCK_R - 1) // BLOCK_R
    if pid < NB:
        for blk in range(pid, NB, num_programs):
            rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
            rmask = rows < HIDDEN
            res = tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)  # requested before the stream
            next_rows = rows + num_programs * BLOCK_R
            y = tl.zeros([BLOCK_R], dtype=tl.float32)
            for j in tl.static_range(TOP_K):
                w_rows = _expert_rows(w2_ptr, ids, slots, j, rows, HIDDEN * INTER, INTER)
                if j + 1 < TOP_K:
                    next_w_rows = _expert_rows(w2_ptr, ids, slots, j + 1, rows, HIDDEN * INTER, INTER)
                    next_rmask = rmask
                else:
                    next_w_rows = _expert_rows(w2_ptr, ids, slots, 0, next_rows, HIDDEN * INTER, INTER)
                    next_rmask = next_rows < HIDDEN
                acc, carry = _stream_carry(gu_ptr + j * INTER, gu_ptr, 1.0, w_rows, rmask, next_w_rows, next_rmask,
                                           INTER, carry, False, False, BLOCK_R, BLOCK_K, 0)
                weight = tl.sum(tl.where(slots == j, weights, 0.0), 0)
                y += tl.sum(acc, 1).to(dt).to(tl.float32) * weight
            y = y.to(dt).to(tl.float32) + res
            tl.store(out_ptr + rows, y.to(dt), mask=rmask)


@triton.jit
def _attention_phase(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr, cache_ptr, bt_ptr, seq_lens_ptr, attn_ptr,
    ws_acc_ptr, ws_ml_ptr, ticket_ptr, eps, scale_log2, k_scale, v_scale, stride_cos, stride_sin,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd, kvh, split,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, HAS_NORM: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, FP8_TILE: tl.constexpr, V_T: tl.constexpr,
):
    """Split `split` of KV head kvh for the one token: its GQA group's q rows normed and rotated
    (_norm_rope_group: the prologue kernel's roundings); the split whose tiles hold the token's position writes
    its K / V to the slot (triton_decode_fused's rule: no other split reads that slot); then the split's KV tiles
    as the split kernel walks them, one split straight to attn [NUM_HEADS * HEAD_DIM], more merged by the last
    to finish (decode_split_attend's inline reduce, a ticket a KV head)."""
    zero = kvh * 0
    tok = zero.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr)
    _, _, _, tile_lo, tile_hi, per_split = decode_split_tiles(seq_len, 0, SPLITS, split, False, BLOCK_N)
    writer = tl.maximum(tile_hi - 1 - tile_lo, 0) // tl.maximum(per_split, 1)
    pos = tl.load(pos_ptr).to(tl.int64)
    dt = qkv_ptr.dtype.element_ty
    q, heads, row_valid, d, d_mask, c, s = group_query(
        qkv_ptr, tok, 0, pos, cos_ptr, sin_ptr, stride_cos, stride_sin, qw_ptr, eps, kvh, GROUP, ROWS, HEAD_DIM,
        HALF, BLOCK_D, HAS_NORM, UPCAST_DOT, KV_FP8)
    rows = tl.arange(0, ROWS)
    slot = tl.load(slot_ptr).to(tl.int64)
    if (slot >= 0) & (split == writer):  # (a graph's padding slot -1 writes nothing)
        k_row = rows == 0  # the KV head's one row, in the group's [ROWS, BLOCK_D] layout
        k = _norm_rope_group(qkv_ptr, tok, 0, NUM_HEADS + kvh + rows * 0, k_row, d, d_mask, kw_ptr, eps, c, s,
                             HEAD_DIM, HALF, HAS_NORM, dt)
        cdt = cache_ptr.dtype.element_ty
        blk, off = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        k_dst = cache_ptr + blk * stride_cb + off * stride_cs + kvh * stride_ch + rows[:, None] * 0 \
            + d[None, :] * stride_cd
        tl.store(k_dst, _to_cache(k, k_scale, cdt, KV_FP8), mask=k_row[:, None] & d_mask[None, :])
        v = tl.load(qkv_ptr + (NUM_HEADS + NUM_KV_HEADS + kvh) * HEAD_DIM + d, mask=d_mask, other=0.0)
        v_dst = cache_ptr + v_offset(blk, off, kvh, d, stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd,
                                     BLOCK_SIZE, V_T)
        tl.store(v_dst, _to_cache(v, v_scale, cdt, KV_FP8), mask=d_mask)
    tl.debug_barrier()  # the CTA's K / V stores ordered before its tile loads read them back
    decode_split_attend(
        q, zero, kvh, split, tok, seq_len, heads, row_valid, d, d_mask, cache_ptr, bt_ptr, attn_ptr, ws_acc_ptr,
        ws_ml_ptr, ticket_ptr, scale_log2, 0, SPLITS, k_scale, v_scale,
        stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd, 0, NUM_HEADS * HEAD_DIM, HEAD_DIM, 1,
        NUM_HEADS, ROWS, BLOCK_D, BLOCK_SIZE, BLOCK_N, False, SPLITS == 1, DOT_PRECISION, KV_FP8, False, SPLITS > 1,
        FP8_TILE, V_T,
    )


@triton.jit(do_not_specialize=["num_programs"])
def _decode_layer_kernel(
    h_ptr, ln1_ptr, wqkv_ptr, bqkv_ptr, qw_ptr, kw_ptr, wo_ptr, bo_ptr, ln2_ptr, wgu_ptr, bgu_ptr, wd_ptr, bd_ptr,
    sqkv_ptr, so_ptr, sgu_ptr, sd_ptr, zqkv_ptr, zo_ptr, zgu_ptr, zd_ptr,
    pos_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, bt_ptr, seq_lens_ptr,
    qkv_ptr, attn_ptr, h2_ptr, gu_ptr, out_ptr, bar_ptr, ws_acc_ptr, ws_ml_ptr, ticket_ptr,
    wr_ptr, logits_ptr, load_ptr, time_ptr, xs_ptr,
    num_programs, xs_stride, eps, qk_eps, scale_log2, k_scale, v_scale, route_scale, stride_cos, stride_sin,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd,
    HIDDEN: tl.constexpr, INTER: tl.constexpr, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, ATTN_SPLITS: tl.constexpr,
    R_QKV: tl.constexpr, K_QKV: tl.constexpr, P_QKV: tl.constexpr, R_O: tl.constexpr, K_O: tl.constexpr,
    P_O: tl.constexpr, R_GU: tl.constexpr, K_GU: tl.constexpr, P_GU: tl.constexpr, R_D: tl.constexpr,
    K_D: tl.constexpr, P_D: tl.constexpr, R_RT: tl.constexpr, K_RT: tl.constexpr, P_RT: tl.constexpr,
    MOE: tl.constexpr, NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_TOPK: tl.constexpr, COUNT_LOAD: tl.constexpr,
    HAS_QKV_BIAS: tl.constexpr, HAS_O_BIAS: tl.constexpr, HAS_GU_BIAS: tl.constexpr, HAS_D_BIAS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, FP8_TILE: tl.constexpr,
    V_T: tl.constexpr, PHASE_LO: tl.constexpr, PHASE_HI: tl.constexpr,
    W_FP8: tl.constexpr = False, W_INT4: tl.constexpr = False, INT4_GROUP: tl.constexpr = 1,
    ASM: tl.constexpr = False, TIMING: tl.constexpr = False, USE_GDC: tl.constexpr = False,
):
    """The layer's phases PHASE_LO..PHASE_HI (module docstring), a barrier between consecutive ones (phase 3 only
    in a MoE layer). R_* / K_* / P_*: each GEMV phase's rows a block, columns a streamed tile and columns
    preloaded before its barrier (P 0: none; a MoE layer's experts are known only after the routing). W_FP8: the
    four projections' weights are fp8 as uint32 words with row scales s*_ptr, their K / P in words; W_INT4: INT4
    words [K / 8, N] with INT4_GROUP-wise scales s*_ptr and zeros z*_ptr, R the output columns a block, K the
    groups a trip, P > 0 the first trip preloaded, the input row staged in the program's scratch xs_ptr[pid *
    xs_stride:] (ASM: the formats' inline PTX, compiled code only). TIMING: each program's clocks to time_ptr[pid]
    (TIMING_SLOTS)."""
    pid = tl.program_id(0)
    xs_ptr += pid.to(tl.int64) * xs_stride
    t_ptr = time_ptr + pid * 16  # TIMING_SLOTS
    if TIMING:
        tl.store(t_ptr, _clock())
        tl.store(t_ptr + 13, _globaltimer())
    QKV_N: tl.constexpr = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    Q_DIM: tl.constexpr = NUM_HEADS * HEAD_DIM
    w_pre = 0.0
    if PHASE_LO <= 0 and PHASE_HI >= 0:
        w_pre = _preload_w(wqkv_ptr, sqkv_ptr, zqkv_ptr, QKV_N, HIDDEN, pid, num_programs, R_QKV, K_QKV, P_QKV,
                           W_FP8, W_INT4, INT4_GROUP)
    gdc_wait(USE_GDC)  # h is the previous layer's output (and the metadata the step's inputs)
    if TIMING:
        tl.store(t_ptr + 1, _clock())
    if PHASE_LO <= 0 and PHASE_HI >= 0:
        inv = _inv_rms(h_ptr, HIDDEN, eps, BLOCK_H)
        _gemv_phase(h_ptr, ln1_ptr, inv, wqkv_ptr, sqkv_ptr, zqkv_ptr, bqkv_ptr, h_ptr, qkv_ptr, xs_ptr, QKV_N, HIDDEN,
                    pid, num_programs, w_pre, False, True, HAS_QKV_BIAS, False, R_QKV, K_QKV, P_QKV, W_FP8,
                    W_INT4, INT4_GROUP, ASM)
    if PHASE_LO <= 0 and PHASE_HI >= 1:
        _grid_barrier(bar_ptr, num_programs, t_ptr, 0, TIMING)
    if PHASE_LO <= 1 and PHASE_HI >= 1:
        for job in range(pid, NUM_KV_HEADS * ATTN_SPLITS, num_programs):
            _attention_phase(
                qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr, cache_ptr, bt_ptr, seq_lens_ptr,
                attn_ptr, ws_acc_ptr, ws_ml_ptr, ticket_ptr, qk_eps, scale_log2, k_scale, v_scale, stride_cos,
                stride_sin, stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd, job // ATTN_SPLITS,
                job % ATTN_SPLITS, NUM_HEADS, NUM_KV_HEADS, GROUP, ROWS, HEAD_DIM, HEAD_DIM // 2, BLOCK_D,
                BLOCK_SIZE, BLOCK_N, ATTN_SPLITS, HAS_NORM, UPCAST_DOT, DOT_PRECISION, KV_FP8, FP8_TILE, V_T,
            )
    if PHASE_LO <= 2 and PHASE_HI >= 2:  # o_proj's first columns: the programs without a KV head at once
        w_pre = _preload_w(wo_ptr, so_ptr, zo_ptr, HIDDEN, Q_DIM, pid, num_programs, R_O, K_O, P_O, W_FP8, W_INT4,
                           INT4_GROUP)
    if PHASE_LO <= 1 and PHASE_HI >= 2:
        _grid_barrier(bar_ptr + 1, num_programs, t_ptr, 1, TIMING)
    if PHASE_LO <= 2 and PHASE_HI >= 2:
        _gemv_phase(attn_ptr, attn_ptr, 1.0, wo_ptr, so_ptr, zo_ptr, bo_ptr, h_ptr, h2_ptr, xs_ptr, HIDDEN, Q_DIM,
                    pid, num_programs, w_pre, False, False, HAS_O_BIAS, True, R_O, K_O, P_O, W_FP8, W_INT4,
                    INT4_GROUP, ASM)
    # the next phase's first weights before barrier 2: the router's (MoE: its rows, one or two a program) or gate/up's
    if MOE:
        if PHASE_LO <= 3 and PHASE_HI >= 3:
            w_pre = _preload_w(wr_ptr, wr_ptr, wr_ptr, NUM_EXPERTS, HIDDEN, pid, num_programs, R_RT, K_RT, P_RT)
    elif PHASE_LO <= 4 and PHASE_HI >= 4:
        w_pre = _preload_w(wgu_ptr, sgu_ptr, zgu_ptr, 2 * INTER, HIDDEN, pid, num_programs, R_GU, K_GU, P_GU, W_FP8,
                           W_INT4, INT4_GROUP, True)
    if PHASE_LO <= 2 and PHASE_HI >= 3:  # (a dense layer has no phase 3: its launches are one or 0..5)
        _grid_barrier(bar_ptr + 2, num_programs, t_ptr, 2, TIMING)
    if PHASE_LO <= 4 and PHASE_HI >= 3:  # h2 is complete: the router and gate/up norm it
        inv2 = _inv_rms(h2_ptr, HIDDEN, eps, BLOCK_H)
    if MOE:
        if PHASE_LO <= 3 and PHASE_HI >= 3:  # router logits = W_r rms_norm(h2)
            _gemv_phase(h2_ptr, ln2_ptr, inv2, wr_ptr, wr_ptr, wr_ptr, wr_ptr, h2_ptr, logits_ptr, xs_ptr, NUM_EXPERTS,
                        HIDDEN, pid, num_programs, w_pre, False, True, False, False, R_RT, K_RT, P_RT)
        if PHASE_LO <= 3 and PHASE_HI >= 4:
            _grid_barrier(bar_ptr + 3, num_programs, t_ptr, 3, TIMING)
        if PHASE_LO <= 5 and PHASE_HI >= 4:  # every program routes the token itself: the same bits everywhere
            weights, ids, slots, kmask = _route_row(logits_ptr, 0, NUM_EXPERTS, 0, route_scale, TOP_K, RENORMALIZE,
                                                    BLOCK_E, BLOCK_TOPK, True)
        if PHASE_LO <= 4 and PHASE_HI >= 4:
            if COUNT_LOAD:
                if pid == 0:
                    tl.atomic_add(load_ptr + ids, tl.full([BLOCK_TOPK], 1, tl.int64), mask=kmask)
            _moe_gate_up_phase(h2_ptr, ln2_ptr, inv2, wgu_ptr, gu_ptr, ids, slots, pid, num_programs, HIDDEN, INTER,
                               TOP_K, R_GU, K_GU)
        if PHASE_LO <= 5 and PHASE_HI >= 5:  # the experts are known: the down phase's first tile before barrier 4
            w_pre = _moe_down_first(wd_ptr, ids, slots, pid, HIDDEN, INTER, R_D, K_D)
    else:
        if PHASE_LO <= 4 and PHASE_HI >= 4:
            _gemv_phase(h2_ptr, ln2_ptr, inv2, wgu_ptr, sgu_ptr, zgu_ptr, bgu_ptr, h2_ptr, gu_ptr, xs_ptr, 2 * INTER,
                        HIDDEN, pid, num_programs, w_pre, False, True, HAS_GU_BIAS, False, R_GU, K_GU, P_GU,
                        W_FP8, W_INT4, INT4_GROUP, ASM, True)
        if PHASE_LO <= 5 and PHASE_HI >= 5:
            w_pre = _preload_w(wd_ptr, sd_ptr, zd_ptr, HIDDEN, INTER, pid, num_programs, R_D, K_D, P_D, W_FP8,
                               W_INT4, INT4_GROUP)
    if PHASE_LO <= 4 and PHASE_HI >= 5:
        _grid_barrier(bar_ptr + 4, num_programs, t_ptr, 4, TIMING)
    if PHASE_LO <= 5 and PHASE_HI >= 5:
        if MOE:
            _moe_down_phase(gu_ptr, wd_ptr, h2_ptr, out_ptr, ids, weights, slots, pid, num_programs, w_pre, HIDDEN,
                            INTER, TOP_K, R_D, K_D)
        else:
            _gemv_phase(gu_ptr, gu_ptr, 1.0, wd_ptr, sd_ptr, zd_ptr, bd_ptr, h2_ptr, out_ptr, xs_ptr, HIDDEN, INTER,
                        pid, num_programs, w_pre, False, False, HAS_D_BIAS, True, R_D, K_D, P_D, W_FP8, W_INT4,
                        INT4_GROUP, ASM)
    if TIMING:
        tl.store(t_ptr + 12, _clock())
        tl.store(t_ptr + 14, _globaltimer())
    gdc_trigger_late(USE_GDC)


def attention_splits(num_programs: int, num_kv_heads: int) -> int:
    """KV splits a KV head in the attention phase: the grid's programs over the KV heads, at most
    MAX_ATTN_SPLITS (the last split merges every split's partial; W1's contexts, <= 384 tokens, are 6 tiles)."""
    return max(1, min(MAX_ATTN_SPLITS, num_programs // num_kv_heads))


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


class DecodeLayerWeights:
    """One decoder layer's tensors as the kernel reads them (contiguous rows; biases and q/k norms optional).
    A MoE layer (router given): wgu / wd are the experts' w13 [E, 2I, H] (gate rows, then up rows) and w2
    [E, H, I], wr the router [E, H], routing (top k, renormalize, scaling) a softmax top-k's
    (layers/moe_routing.SoftmaxTopK.as_softmax_topk), expert_load the per-expert counter (int64 [E]) or None.
    A dense layer's four projections (wqkv, wo, wgu, wd) may instead be quantized, all four alike: fp8 (e4m3
    [N, K]) with scales their fp32 row scales [N]; or INT4 (quant_ref's internal layout: qweight int32 [K / 8, N])
    with scales and zeros their [K / group_size, N] and group_size 16 times a power of two (int4_group_fits)."""

    __slots__ = ("ln1", "wqkv", "bqkv", "q_norm", "k_norm", "wo", "bo", "ln2", "wgu", "bgu", "wd", "bd", "eps",
                 "qk_eps", "wr", "routing", "expert_load", "scales", "zeros", "group_size")

    def __init__(self, ln1, wqkv, wo, ln2, wgu, wd, eps, *, bqkv=None, q_norm=None, k_norm=None, bo=None,
                 bgu=None, bd=None, qk_eps=None, wr=None, routing=None, expert_load=None, scales=None, zeros=None,
                 group_size=None):
        self.ln1, self.wqkv, self.bqkv, self.wo, self.bo = ln1, wqkv, bqkv, wo, bo
        self.q_norm, self.k_norm, self.ln2, self.wgu, self.bgu, self.wd, self.bd = q_norm, k_norm, ln2, wgu, bgu, wd, bd
        self.eps = float(eps)
        self.qk_eps = float(eps if qk_eps is None else qk_eps)
        self.wr, self.routing, self.expert_load = wr, routing, expert_load
        self.scales = None if scales is None else tuple(scales)
        self.zeros = None if zeros is None else tuple(zeros)
        self.group_size = group_size
        if (wr is None) != (routing is None):
            raise ValueError("DecodeLayerWeights: a MoE layer takes both the router and its routing")
        dtypes = {t.dtype for t in (wqkv, wo, wgu, wd)}
        quantized = dtypes & {FP8_DTYPE, torch.int32}
        if quantized and (len(dtypes) != 1 or self.moe or self.scales is None or len(self.scales) != 4):
            raise ValueError("DecodeLayerWeights: quantized weights are a dense layer's four projections in one "
                             "format, with their four scales")
        if torch.int32 in quantized and (self.zeros is None or len(self.zeros) != 4 or not int4_group_fits(group_size)):
            raise ValueError("DecodeLayerWeights: INT4 weights take their four zeros and a group size of 16 times a "
                             f"power of two, got {group_size}")
        if not quantized and (self.scales is not None or self.zeros is not None):
            raise ValueError("DecodeLayerWeights: scales and zeros belong to quantized weights")

    @property
    def moe(self) -> bool:
        return self.wr is not None

    @property
    def fp8(self) -> bool:
        return self.wqkv.dtype == FP8_DTYPE

    @property
    def int4(self) -> bool:
        return self.wqkv.dtype == torch.int32

    def out_in(self, t: torch.Tensor) -> tuple[int, ...]:
        """(output, input) features of one of the dense projections (INT4 words run [K / 8, N])."""
        return (t.shape[1], t.shape[0] * 8) if self.int4 else tuple(t.shape)


# (device, the launch's constants, programs an SM) whose one-wave check passed: the check compiles (or finds) the
# kernel once per configuration, not per launch
_one_wave_checked: set[tuple] = set()


def _check_one_wave(key: tuple, kernel, programs_per_sm: int, num_warps: int) -> None:
    """Raise unless programs_per_sm programs of the compiled kernel fit an SM together (shared memory, warps;
    registers are capped at launch), so that the grid barrier opens."""
    shared = kernel.metadata.shared
    if programs_per_sm * shared > SMEM_PER_SM or programs_per_sm * num_warps > MAX_WARPS_PER_SM:
        raise ValueError(f"decode_layer: {programs_per_sm} programs an SM of {num_warps} warps and {shared} B of "
                         "shared memory cannot all be resident; the grid barrier would never open")
    _one_wave_checked.add(key)


def _check_quantized(h: torch.Tensor, w: DecodeLayerWeights) -> None:
    """Quantized weights as the kernel reads them: a 16-bit row, 8-byte aligned as the norm weights (the batch-1
    GEMVs' weight-only semantics, x read as 8-byte quads); fp8:
    rows of whole words (K a multiple of 4) and fp32 row scales [N]; INT4: scales and zeros [K / group, N] of the
    row's dtype or fp32, contiguous."""
    if h.element_size() != 2:
        raise ValueError(f"decode_layer: quantized weights take a 16-bit row, got {h.dtype}")
    if any(t.data_ptr() % 8 for t in (h, w.ln1, w.ln2)):  # their phases read x four features at a time
        raise ValueError("decode_layer: quantized weights read the row and the norm weights 8 bytes at a time; "
                         "one of them is not 8-byte aligned")
    for i, (name, t) in enumerate(zip(("qkv", "o", "gate_up", "down"), (w.wqkv, w.wo, w.wgu, w.wd))):
        n, k = w.out_in(t)
        s = w.scales[i]
        if w.fp8 and (k % 4 or s.dtype != torch.float32 or s.shape != (n,) or not s.is_contiguous()):
            raise ValueError(f"decode_layer: the fp8 {name} weight {tuple(t.shape)} needs K a multiple of 4 and "
                             f"fp32 row scales [{n}], got {s.dtype} {tuple(s.shape)}")
        if w.int4:
            groups = (k // w.group_size, n)
            for what, v in (("scales", s), ("zeros", w.zeros[i])):
                if k % w.group_size or v.shape != groups or not v.is_contiguous() or v.dtype not in (
                        torch.float16, torch.bfloat16, torch.float32):
                    raise ValueError(f"decode_layer: the INT4 {name} weight ({n} x {k}, groups of {w.group_size}) "
                                     f"needs {what} {list(groups)}, got {v.dtype} {tuple(v.shape)}")


def decode_layer(h: torch.Tensor, w: DecodeLayerWeights, positions: torch.Tensor, cos_cache: torch.Tensor,
                 sin_cache: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, num_heads: int,
                 num_kv_heads: int, barriers: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0,
                 programs_per_sm: int = 1, num_warps: int = 8, one_launch: bool | None = None,
                 num_programs: int | None = None, attn_splits: int | None = None, pdl: bool | None = None,
                 fp8_path: str = "convert", stream_values: int = 32,
                 timing: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder layer for one token: h [1, HIDDEN] (the whole residual stream) -> the next one [1, HIDDEN];
    K / V of the token go to the cache at slot_mapping[0]. barriers: BARRIERS_PER_LAYER int32 counters, zero
    (one_launch). one_launch (None: on a GPU outside the interpreter) runs every phase in one launch of
    num_programs programs (None: programs_per_sm x SMs); else one launch a phase. attn_splits: KV splits a KV
    head in the attention phase (None: attention_splits). stream_values: 16-bit weight values a thread streams a
    trip in the GEMV phases (gemv_phase_tile; fp8 and INT4 weights the same bytes). timing: int64 [programs,
    TIMING_SLOTS], each program's clocks (one launch on a GPU only; tools/decode_layer_phases.py reads them). No host
    syncs: CUDA-graph safe once compiled (the tickets of the splits' merge are made outside any capture:
    tickets_usable)."""
    hidden = h.shape[-1]
    if h.numel() != hidden:
        raise ValueError(f"decode_layer takes one row, got {tuple(h.shape)}")
    head_dim = kv_cache.shape[-1]
    inter = w.wd.shape[-1] if w.moe else w.out_in(w.wd)[1]
    qkv_n = (num_heads + 2 * num_kv_heads) * head_dim
    if w.out_in(w.wqkv) != (qkv_n, hidden) or w.out_in(w.wo) != (hidden, num_heads * head_dim):
        raise ValueError("decode_layer: the QKV / o weights do not match the heads and the hidden size")
    experts = (w.wr.shape[0],) if w.moe else ()
    if w.moe and (w.wgu.shape != (*experts, 2 * inter, hidden) or w.wd.shape != (*experts, hidden, inter)):
        raise ValueError("decode_layer: the experts' gate/up and down weights do not match")
    if not w.moe and (w.out_in(w.wgu) != (2 * inter, hidden) or w.out_in(w.wd) != (hidden, inter)):
        raise ValueError("decode_layer: the gate/up and down weights do not match")
    if w.moe and (w.wr.shape != (experts[0], hidden) or w.bgu is not None or w.bd is not None):
        raise ValueError("decode_layer: a MoE layer takes a router of [experts, hidden] and no expert biases")
    if w.fp8 or w.int4:
        _check_quantized(h, w)
    if barriers.dtype != torch.int32 or barriers.numel() < BARRIERS_PER_LAYER:
        raise ValueError(f"decode_layer needs {BARRIERS_PER_LAYER} int32 barrier counters")
    dev, dt = h.device, h.dtype
    if one_launch is None:
        one_launch = h.is_cuda and not interpreting()
    sms = _num_sms(dev.index) if h.is_cuda else 4
    num_programs = num_programs or programs_per_sm * sms
    if one_launch and num_programs > programs_per_sm * sms:
        raise ValueError(f"decode_layer: {num_programs} programs are more than one wave of {programs_per_sm} an SM")
    if timing is not None and (not one_launch or interpreting() or timing.dtype != torch.int64
                               or timing.shape != (num_programs, TIMING_SLOTS)):
        raise ValueError(f"decode_layer: timing takes one launch on a GPU and int64 [{num_programs}, "
                         f"{TIMING_SLOTS}] clocks")
    qkv = torch.empty(qkv_n, dtype=dt, device=dev)
    attn = torch.empty(num_heads * head_dim, dtype=dt, device=dev)
    h2 = torch.empty(hidden, dtype=dt, device=dev)
    top_k = w.routing[0] if w.moe else 1
    gu = torch.empty(top_k * 2 * inter, dtype=dt, device=dev)
    logits = torch.empty(experts[0] if w.moe else 1, dtype=dt, device=dev)
    out = torch.empty_like(h)
    group = num_heads // num_kv_heads
    splits = attn_splits or attention_splits(num_programs, num_kv_heads)
    block_d = max(16, _next_pow2(head_dim))
    if splits > 1 and not tickets_usable(dev):
        splits = 1  # first met inside a capture: the engine's eager warm-up runs before it, with the tickets
    ws_acc = torch.empty((num_heads * splits, block_d) if splits > 1 else (1,), dtype=torch.float32, device=dev)
    ws_ml = torch.empty((num_heads * splits, 2) if splits > 1 else (1,), dtype=torch.float32, device=dev)
    tickets = ticket_workspace(dev) if splits > 1 else barriers
    # INT4: each program's staged input row (int4_stage_x), for the widest K of the four projections. (The 16-bit
    # phases keep computing x on each trip: staged, their trips read x in the weights' layout without barriers but
    # convert every value again, 6.2 instructions a weight against 4.7, and a small model's phases would wait one
    # more round trip to L2 for the staged row.)
    xs_stride = int4_scratch_words(max(hidden, num_heads * head_dim, inter)) if w.int4 else 0
    scratch = torch.empty(num_programs * xs_stride, dtype=torch.int32, device=dev) if w.int4 else barriers
    has_norm = w.q_norm is not None
    cap = max_registers(programs_per_sm, num_warps) if h.is_cuda else None
    gdc = gdc_kwargs(h, pdl, programs=num_programs, num_warps=num_warps) if one_launch else {"USE_GDC": False}
    # fp8 weights as uint32 words (four features each); quantized weights' scales (and INT4's zeros) beside them
    wqkv, wo, wgu, wd = (t.view(torch.int32) if w.fp8 else t for t in (w.wqkv, w.wo, w.wgu, w.wd))
    scales = w.scales or (h, h, h, h)
    zeros = w.zeros or (h, h, h, h)
    args = (
        h, w.ln1, wqkv, w.bqkv if w.bqkv is not None else h, w.q_norm if has_norm else h,
        w.k_norm if has_norm else h, wo, w.bo if w.bo is not None else h, w.ln2, wgu,
        w.bgu if w.bgu is not None else h, wd, w.bd if w.bd is not None else h, *scales, *zeros,
        positions, cos_cache, sin_cache, slot_mapping, kv_cache, block_tables, seq_lens,
        qkv, attn, h2, gu, out, barriers, ws_acc, ws_ml, tickets,
        w.wr if w.moe else h, logits, w.expert_load if w.expert_load is not None else barriers,
        timing if timing is not None else barriers, scratch,
        num_programs, xs_stride, w.eps, w.qk_eps, scale * _LOG2E, float(k_scale), float(v_scale),
        float(w.routing[2]) if w.moe else 1.0,
        cos_cache.stride(0), sin_cache.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
    )
    consts = dict(
        HIDDEN=hidden, INTER=inter, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group,
        ROWS=max(16, _next_pow2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d, ATTN_SPLITS=splits,
        BLOCK_SIZE=kv_cache.shape[2], BLOCK_N=ATTENTION_BLOCK_N,
        BLOCK_H=_next_pow2(hidden),
        HAS_QKV_BIAS=w.bqkv is not None, HAS_O_BIAS=w.bo is not None, HAS_GU_BIAS=w.bgu is not None,
        HAS_D_BIAS=w.bd is not None,
        HAS_NORM=has_norm, UPCAST_DOT=_upcast_dot(h), DOT_PRECISION=_dot_precision(h), KV_FP8=_is_fp8(kv_cache),
        FP8_TILE=_fp8_tile(fp8_path, h, kv_cache), V_T=v_transposed(kv_cache),
        MOE=w.moe, NUM_EXPERTS=experts[0] if w.moe else 1, TOP_K=top_k, RENORMALIZE=bool(w.moe and w.routing[1]),
        BLOCK_E=_next_pow2(experts[0]) if w.moe else 1, BLOCK_TOPK=_next_pow2(top_k),
        COUNT_LOAD=w.expert_load is not None, W_FP8=w.fp8, W_INT4=w.int4, INT4_GROUP=w.group_size or 1,
        ASM=(w.fp8 or w.int4) and h.is_cuda and not interpreting(), TIMING=timing is not None,
        num_warps=num_warps, num_stages=1, **({} if cap is None else {"maxnreg": cap}),
    )
    fmt = "fp8" if w.fp8 else "int4" if w.int4 else "16-bit"
    # (INT4's qkv tile was chosen for its K / 8 word rows as if they were its output columns until 2026-12-05)
    consts.update(phase_tiles(qkv_n, num_heads * head_dim, hidden, inter, top_k, logits.numel(), w.moe, fmt,
                              w.group_size, num_programs, 32 * num_warps, stream_values))
    if one_launch:
        key = (dev.index, programs_per_sm, dt, kv_cache.dtype, *sorted(consts.items()), *sorted(gdc.items()))
        if key not in _one_wave_checked:
            kernel = _decode_layer_kernel.warmup(*args, PHASE_LO=0, PHASE_HI=NUM_PHASES - 1, grid=(num_programs,),
                                                 **consts, **gdc)
            _check_one_wave(key, kernel, programs_per_sm, num_warps)
        _decode_layer_kernel[(num_programs,)](*args, PHASE_LO=0, PHASE_HI=NUM_PHASES - 1, **consts, **gdc)
    else:
        for phase in range(NUM_PHASES):
            if phase != 3 or w.moe:
                _decode_layer_kernel[(num_programs,)](*args, PHASE_LO=phase, PHASE_HI=phase, **consts)
    return out


def decode_layer_ref(h: torch.Tensor, w: DecodeLayerWeights, positions: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor, kv_cache: torch.Tensor, meta, scale: float, num_heads: int,
                     num_kv_heads: int, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """The plain path's ops composed (rms_norm, the projections, qkv_rope_cache's split / norm / rotary / write,
    paged attention, SiLU-and-mul): h [1, HIDDEN] -> the next residual stream; writes the cache as it goes."""
    from meshserve.kernels.attention_ref import paged_attention_ref
    from meshserve.kernels.moe_ref import fused_experts_ref, softmax_topk_ref
    from meshserve.kernels.quant_ref import fp8_weight_only_ref, int4_linear_ref
    from meshserve.kernels.triton_ops import qkv_rope_cache_ref, rms_norm_ref, silu_and_mul_ref

    def linear(x, i, weight, bias):  # the i-th projection: quantized weights as the batch-1 GEMVs read them
        if w.fp8:
            return fp8_weight_only_ref(x, weight, w.scales[i], bias)
        if w.int4:
            return int4_linear_ref(x, weight, w.scales[i], w.zeros[i], w.group_size, None, bias)
        return F.linear(x, weight, bias)

    dt = h.dtype
    qkv = linear(rms_norm_ref(h, w.ln1, w.eps), 0, w.wqkv, w.bqkv)
    q = qkv_rope_cache_ref(qkv, positions, cos_cache, sin_cache, w.q_norm, w.k_norm, w.qk_eps, kv_cache,
                           meta.slot_mapping, num_heads, num_kv_heads, k_scale, v_scale)
    attn = paged_attention_ref(q, kv_cache, meta, scale, None, k_scale, v_scale).flatten(1)
    h2 = (linear(attn, 1, w.wo, w.bo).float() + h.float()).to(dt)
    x = rms_norm_ref(h2, w.ln2, w.eps)
    if w.moe:
        top_k, renormalize, scaling = w.routing
        weights, ids = softmax_topk_ref(F.linear(x, w.wr), top_k, renormalize, scaling, w.expert_load)
        return (fused_experts_ref(x, w.wgu, w.wd, weights, ids).float() + h2.float()).to(dt)
    gu = silu_and_mul_ref(linear(x, 2, w.wgu, w.bgu))
    return (linear(gu, 3, w.wd, w.bd).float() + h2.float()).to(dt)
