"""The one-launch decoder layer's expert phases (triton_decode_layer, MoE layers): gate_up over the chosen
experts' w13 rows ending in each expert's activation, and down over their w2 rows, summed as kernels/moe_ref sums
them; the dense phases' stream (triton_decode_layer_gemv) carried across blocks and experts."""

from __future__ import annotations

import triton
import triton.language as tl

from meshserve.kernels.triton_decode_layer_gemv import _block_rows, _store_act, _stream_carry, _tile_at


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
