"""GQA decode attention with the batch's KV work balanced over a fixed number of programs per KV head
(triton_mla_balanced's scheduling for the paged GQA cache): decode_attention's contract for the one-token rows.

Why: decode_attention launches one program per (sequence, KV head) at W2's batches (one split), 2,048 programs
for 256 sequences x 8 KV heads. With ~6 resident an SM that is 2.6 waves on an H200, the last one 60% full, and
W2's contexts (100 to 2,048 tokens) leave the SMs that drew long ones streaming while the rest idle: the fp8
tile ran at 2.66 TB/s at a uniform batch 256 x 800 where a copy runs at 4.2 (BENCHMARKS.md, thirty-seventh
session). Here each KV head's work is one line of cost units (a sequence: its KV tiles plus OVERHEAD units for
its q load, block-table walk and output), cut into num_programs equal ranges; program p walks the sequences its
range overlaps, so every program streams about the same bytes whatever the lengths, in one wave.

* ``_decode_balanced_kernel``: grid (num_programs, KV heads). Each program rebuilds the cost line from seq_lens
  and query_start_loc (rows with one query token; padding and a mixed batch's prompt rows cost nothing), finds
  its first sequence and walks on through the decode tile (attend_paged_kv_tile, every cache dtype and V
  layout). A sequence whole in one program is written straight to the output; a sequence cut by range
  boundaries leaves a piece in each program it spans, in that program's slot 2p (the piece its range starts
  in) or 2p + 1 (the piece it ends in), and the program that stores its last piece (a ticket per sequence and
  KV head, as the split kernel's inline reduce) merges the pieces of its GQA group (_merge_group): one launch.
  The walk holds scalars only (a sequence's cost from its own length).

No sliding window (TritonAttentionBackend keeps the split kernel there). No host sync: CUDA-graph safe (the grid
depends on the GPU, not on the batch's lengths). On by default on Hopper (6 programs an SM over an fp8 cache, 4
over a 16-bit one; MESHSERVE_DECODE_BALANCED, layers/backend_selection.py): H200 W2 Llama-3.1-8B fp8 + fp8 KV
-4.0%, bf16 -2.9%, Qwen3-0.6B bf16 -4.2% (BENCHMARKS.md, thirty-ninth session).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.kv_layout import v_transposed
from meshserve.kernels.pdl import gdc_kwargs
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait
from meshserve.kernels.tickets import MAX_TICKETS, ticket_workspace, tickets_usable
from meshserve.kernels.triton_attention import (
    _LOG2E,
    _NEG_BIG,
    _dot_precision,
    _fp8_tile,
    _is_fp8,
    _next_pow2,
    _num_sms,
    _upcast_dot,
    decode_attention,
)
from meshserve.kernels.triton_attention_tile import attend_paged_kv_tile, dot_query
from meshserve.kernels.triton_kv_layout import v_head_base

OVERHEAD = 1  # cost units of a sequence beyond its tiles (a 64-token fp8 tile is 16 KB; q, table, output ~2 KB);
# at least 1: a decode row's cost is never 0, so every one has a program (a seq_len-0 row writes zeros)


@triton.jit
def _decode_cost_line(seq_lens_ptr, qsl_ptr, num_seqs, num_programs, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                      OVERHEAD_UNITS: tl.constexpr):
    """Per sequence (vectors over the batch): cost, inclusive cumulative cost; and the range width.
    Only one-token rows cost anything (a mixed batch's prompt rows are the prefill kernel's), each at least its
    OVERHEAD: a row over no keys (seq_len 0) is still some program's to write (zeros)."""
    bi = tl.arange(0, BLOCK_B)
    b_mask = bi < num_seqs
    lens = tl.load(seq_lens_ptr + bi, mask=b_mask, other=0).to(tl.int32)
    q_lo = tl.load(qsl_ptr + bi, mask=b_mask, other=0).to(tl.int32)
    q_hi = tl.load(qsl_ptr + bi + 1, mask=b_mask, other=0).to(tl.int32)
    decode = (q_hi - q_lo) == 1
    tiles = tl.where(decode, (lens + BLOCK_N - 1) // BLOCK_N, 0)
    cost = tl.where(decode, tiles + OVERHEAD_UNITS, 0)
    cum = tl.cumsum(cost, 0)
    width = tl.maximum((tl.sum(cost, 0) + num_programs - 1) // num_programs, 1)
    return bi, cost, cum, width


@triton.jit(do_not_specialize=["num_seqs", "stride_btb"])  # see triton_attention._decode_split_kernel
def _decode_balanced_kernel(
    q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, ws_acc_ptr, ws_ml_ptr, ticket_ptr,
    scale_log2, num_seqs, num_programs, k_scale, v_scale,
    stride_qt, stride_qh, stride_qd,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_btb,
    stride_ot, stride_oh, stride_od,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr, OVERHEAD_UNITS: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr, FP8_TILE: tl.constexpr, V_T: tl.constexpr, USE_GDC: tl.constexpr = False,
):
    p = tl.program_id(0)
    kvh = tl.program_id(1)
    gdc_wait(USE_GDC)  # q comes from the prologue kernel, the metadata from the step's inputs
    # the batch's vectors only up to the walk's first sequence: the walk itself keeps scalars (the vectors
    # over 256+ sequences held across the tile loop cost 50 registers a thread at 2 warps, and occupancy)
    bi, cost, cum, width = _decode_cost_line(seq_lens_ptr, qsl_ptr, num_seqs, num_programs, BLOCK_B, BLOCK_N,
                                             OVERHEAD_UNITS)
    start = p * width
    end = tl.minimum(start + width, tl.sum(cost, 0))
    b = tl.sum((cum <= start).to(tl.int32), 0)  # the first sequence whose cost range reaches past start
    # a program past the batch's work (start >= total: every cum <= start, b = BLOCK_B) walks nothing
    c_lo = tl.where(b < num_seqs, tl.sum(tl.where(bi == b, cum - cost, 0), 0), end)

    rows = tl.arange(0, ROWS)
    row_valid = rows < GROUP
    heads = kvh * GROUP + rows
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    n_off = tl.arange(0, BLOCK_N)
    k_base = cache_ptr + kvh * stride_ch
    v_base = v_head_base(cache_ptr, kvh, stride_ckv, stride_ch, BLOCK_SIZE, V_T)

    while c_lo < end:
        # int32 whatever the metadata's width: the walk's cursors are loop-carried and must keep one type (the
        # engine's graph inputs are int64, the cost line's sums int32)
        seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
        q_start = tl.load(qsl_ptr + b).to(tl.int32)
        q_len = tl.load(qsl_ptr + b + 1).to(tl.int32) - q_start
        n_tiles = tl.where(q_len == 1, tl.cdiv(seq_len, BLOCK_N), 0)
        c_hi = c_lo + tl.where(q_len == 1, n_tiles + OVERHEAD_UNITS, 0)
        if c_hi > c_lo:  # zero-cost rows (padding, a mixed batch's prompt rows) own no piece: skip them
            # this program's units of the sequence -> its tiles (the first OVERHEAD units carry none)
            t0 = tl.minimum(tl.maximum(start - c_lo - OVERHEAD_UNITS, 0), n_tiles)
            t1 = tl.minimum(tl.maximum(tl.minimum(end, c_hi) - c_lo - OVERHEAD_UNITS, 0), n_tiles)
            tok = q_start.to(tl.int64)
            q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                        mask=row_valid[:, None] & d_mask[None, :], other=0.0)
            q = dot_query(q, UPCAST_DOT, KV_FP8)
            m_i = tl.full([ROWS], _NEG_BIG, dtype=tl.float32)
            l_i = tl.zeros([ROWS], dtype=tl.float32)
            acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
            q_last = tl.zeros([ROWS], dtype=tl.int32) + (seq_len - 1)
            bt_row = bt_ptr + b.to(tl.int64) * stride_btb
            for t in range(t0, t1):
                kv_pos = t * BLOCK_N + n_off
                acc, m_i, l_i = attend_paged_kv_tile(
                    q, q_last, acc, m_i, l_i, kv_pos, kv_pos < seq_len, 0, bt_row, k_base, v_base, d, d_mask,
                    scale_log2, k_scale, v_scale, stride_cb, stride_cs, stride_cd,
                    BLOCK_SIZE, False, False, KV_FP8, DOT_PRECISION, FP8_TILE, V_T,
                )
            if (c_lo >= start) & (c_hi <= end):  # the whole sequence is this program's
                o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
                tl.store(out_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :] * stride_od,
                         o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])
            else:
                # a piece: program p holds at most two, the sequence it starts in (slot 2p) and the one it
                # ends in (2p + 1); _merge_group finds them from the first program alone (_piece_slot)
                slot = 2 * p + tl.where(c_lo < start, 0, 1)
                ws_row = slot.to(tl.int64) * NUM_HEADS + heads  # acc [slots, H, BLOCK_D], ml [slots, H, 2], fp32
                tl.store(ws_acc_ptr + ws_row[:, None] * BLOCK_D + d[None, :], acc, mask=row_valid[:, None])
                tl.store(ws_ml_ptr + ws_row * 2, m_i, mask=row_valid)
                tl.store(ws_ml_ptr + ws_row * 2 + 1, l_i, mask=row_valid)
                # the last piece's program merges the group (ticket_ptr: int32 [sequences x KV heads], zero on
                # entry and on exit), as the split kernel's LAST_REDUCES does
                ticket_slot = ticket_ptr + b.to(tl.int64) * tl.num_programs(1) + kvh
                tl.debug_barrier()  # every lane's piece stored before the release below
                ticket = tl.atomic_add(ticket_slot, 1, sem="acq_rel", scope="gpu")
                first = c_lo // width
                n_pieces = (c_hi - 1) // width - first + 1
                if ticket == n_pieces - 1:  # every piece is visible (acquire)
                    tl.debug_barrier()
                    _merge_group(ws_acc_ptr, ws_ml_ptr, out_ptr, first, n_pieces, heads, row_valid, d, d_mask,
                                 tok, stride_ot, stride_oh, stride_od, NUM_HEADS, ROWS, BLOCK_D)
                    tl.store(ticket_slot, 0)
        c_lo = c_hi
        b += 1
    gdc_trigger_late(USE_GDC)


@triton.jit
def _piece_slot(first, k):
    """The workspace slot of a cut sequence's k-th piece: its first program's piece ends that program's range
    (slot 2 first + 1); every later one starts its program's range (2 q)."""
    return tl.where(k == 0, 2 * first + 1, 2 * (first + k))


@triton.jit
def _merge_group(ws_acc_ptr, ws_ml_ptr, out_ptr, first, n_pieces, heads, row_valid, d, d_mask, tok,
                 stride_ot, stride_oh, stride_od, NUM_HEADS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The inline merge: a cut sequence's pieces for one GQA group's rows combined (the largest max first, then
    the weighted sums), as triton_attention._reduce_group_partials; loads bypass L1 (.cg): other SMs wrote
    them."""
    m_max = tl.full([ROWS], _NEG_BIG, dtype=tl.float32)
    for k in range(n_pieces):
        row = _piece_slot(first, k).to(tl.int64) * NUM_HEADS + heads
        m_max = tl.maximum(m_max, tl.load(ws_ml_ptr + row * 2, mask=row_valid, other=_NEG_BIG, cache_modifier=".cg"))
    l_tot = tl.zeros([ROWS], dtype=tl.float32)
    o = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for k in range(n_pieces):
        row = _piece_slot(first, k).to(tl.int64) * NUM_HEADS + heads
        m_k = tl.load(ws_ml_ptr + row * 2, mask=row_valid, other=_NEG_BIG, cache_modifier=".cg")
        l_k = tl.load(ws_ml_ptr + row * 2 + 1, mask=row_valid, other=0.0, cache_modifier=".cg")
        w = tl.where(row_valid, tl.exp2(m_k - m_max), 0.0)
        acc_k = tl.load(ws_acc_ptr + row[:, None] * BLOCK_D + d[None, :], mask=row_valid[:, None], other=0.0,
                        cache_modifier=".cg")
        l_tot += w * l_k
        o += acc_k * w[:, None]
    o = o / tl.where(l_tot > 0, l_tot, 1.0)[:, None]
    tl.store(out_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


# An SM's 65,536 registers are four sub-partitions' 16,384, and a warp takes all of its registers from the one it
# runs on (sm_80 - sm_90): N programs of W warps fit when ceil(N * W / 4) warps fit one sub-partition
SUBPARTITIONS, REGISTERS_PER_SUBPARTITION = 4, 16384


# the cost line's width (the batch vector of _decode_cost_line): one compiled variant for every batch up to 256
# (the engine's default max_num_seqs), so the eager warm-up's one step (engine/eager_warmup.grid_tile_steps, at the
# smallest routed batch) builds what every such batch runs; the vectors are read before the walk, which keeps
# scalars (W2's batch 256 ran this width)
MIN_BLOCK_B = 256


def max_registers(programs_per_sm: int, num_warps: int) -> int | None:
    """The per-thread register cap that lets programs_per_sm programs of num_warps warps share an SM's register
    file, so the launch is the one wave the balancing assumes (None: no cap needed). At the grid tile (64 tokens,
    2 warps) the kernel takes 203 (bf16) to 214 (fp8, V transposed) registers a thread unbounded: 2 warps a
    sub-partition, 4 programs an SM; 5 or 6 need 3 warps a sub-partition, so 168 (the fp8 tile spills 64 B, the
    bf16 one 88 B; sm_90, tools/decode_attention_sass.py --kernel balanced --maxnreg 168). The whole SM's file
    alone said 200 for 5, which left 4 resident: the thirty-ninth session's 5-an-SM launches ran ~1.5x slower
    than 4 or 6. Shared memory is the launch's other limit, not checked here: ~38 KB a program at the grid tile,
    so 5 fit an SM with a 16-bit cache, 6 with fp8."""
    warps_per_subpartition = -(-programs_per_sm * num_warps // SUBPARTITIONS)
    cap = REGISTERS_PER_SUBPARTITION // (warps_per_subpartition * 32) // 8 * 8
    return cap if cap < 255 else None


def balanced_programs(num_kv_heads: int, programs_per_sm: int, device: torch.device) -> int:
    """Programs per KV head: programs_per_sm on every SM over all KV heads together, one wave (at least 1)."""
    sms = _num_sms(device.index if device.type == "cuda" else None)
    return max(1, programs_per_sm * sms // num_kv_heads)


def decode_attention_balanced(query, kv_cache, block_tables, seq_lens, query_start_loc, scale, out,
                              tile: tuple[int, int, int], programs_per_sm: int, k_scale: float = 1.0,
                              v_scale: float = 1.0, fp8_path: str = "words",
                              num_programs: int | None = None) -> torch.Tensor:
    """triton_attention.decode_attention's contract without a window (one query per sequence; rows with
    q_len != 1 untouched, seq_len-0 rows zeros) with the work balanced over num_programs programs per KV head
    (None: balanced_programs). tile: (BLOCK_N, num_warps, num_stages). The split kernel (one split, the same
    tile) serves a batch past the ticket buffer, and a launch met first inside a CUDA-graph capture: the tickets
    are made outside any (a capture's allocation belongs to its graph's pool; the engine's eager warm-ups decode
    at these batches first, engine/eager_warmup.grid_tile_steps)."""
    num_seqs = seq_lens.shape[0]
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    if query.shape[0] == 0 or num_seqs == 0:
        return out
    block_n, num_warps, num_stages = tile
    dev = query.device
    if num_seqs * num_kv_heads > MAX_TICKETS or not tickets_usable(dev):
        return decode_attention(query, kv_cache, block_tables, seq_lens, query_start_loc, scale, None, out, 1,
                                block_n=block_n, num_warps=num_warps, num_stages=num_stages, k_scale=k_scale,
                                v_scale=v_scale, fp8_path=fp8_path)
    if num_programs is None:
        num_programs = balanced_programs(num_kv_heads, programs_per_sm, dev)
    group = num_heads // num_kv_heads
    block_d = max(16, _next_pow2(head_dim))
    slots = 2 * num_programs
    ws_acc = torch.empty((slots, num_heads, block_d), dtype=torch.float32, device=dev)
    ws_ml = torch.empty((slots, num_heads, 2), dtype=torch.float32, device=dev)
    gdc = gdc_kwargs(query, programs=num_programs * num_kv_heads, num_warps=num_warps)
    cap = max_registers(programs_per_sm, num_warps) if query.is_cuda else None
    _decode_balanced_kernel[(num_programs, num_kv_heads)](
        query, kv_cache, block_tables, seq_lens, query_start_loc, out, ws_acc, ws_ml, ticket_workspace(dev),
        scale * _LOG2E, num_seqs, num_programs, float(k_scale), float(v_scale),
        query.stride(0), query.stride(1), query.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        NUM_HEADS=num_heads, GROUP=group, ROWS=max(16, _next_pow2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=kv_cache.shape[2], BLOCK_N=block_n, BLOCK_B=max(MIN_BLOCK_B, _next_pow2(num_seqs)),
        OVERHEAD_UNITS=OVERHEAD, UPCAST_DOT=_upcast_dot(query), DOT_PRECISION=_dot_precision(query),
        KV_FP8=_is_fp8(kv_cache), FP8_TILE=_fp8_tile(fp8_path, query, kv_cache), V_T=v_transposed(kv_cache),
        num_warps=num_warps, num_stages=num_stages, **gdc, **({} if cap is None else {"maxnreg": cap}),
    )
    return out
