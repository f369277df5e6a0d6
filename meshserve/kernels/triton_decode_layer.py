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
a single launch of every phase is the GPU's. Reference: decode_layer_ref.py (the plain path's ops composed).

Files: this one holds the barrier, the attention phase, the kernel and its launch; triton_decode_layer_gemv the
dense GEMV phases and every phase's tiles (16-bit here, fp8 and INT4 in triton_decode_layer_fp8 / _int4),
triton_decode_layer_moe the experts' phases, decode_layer_weights the layer's tensors as the kernel reads them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.decode_layer_weights import DecodeLayerWeights
from meshserve.kernels.kv_layout import v_transposed
from meshserve.kernels.pdl import gdc_kwargs, interpreting
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait
from meshserve.kernels.tickets import ticket_workspace, tickets_usable
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
from meshserve.kernels.triton_decode_layer_gemv import _gemv_phase, _preload_w, phase_tiles
from meshserve.kernels.triton_decode_layer_int4 import int4_scratch_words
from meshserve.kernels.triton_decode_layer_moe import _moe_down_first, _moe_down_phase, _moe_gate_up_phase
from meshserve.kernels.triton_kv_layout import v_offset
from meshserve.kernels.triton_moe_routing import _route_row
from meshserve.kernels.triton_ops import _to_cache

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

