"""Triton kernels for multi-head latent attention (DeepSeek MLA): the latent cache write and the absorbed
decode attention, both with the semantics of kernels/mla_ref.py (write_latent_ref, mla_decode_ref).

Cache layout per layer: [1, num_blocks, block_size, 1, R + P] (latent c, then the rotated shared key k_pe).

* ``_write_latent_kernel``: grid (num_tokens,); one token's [c, k_pe] row to its slot; slot < 0 (CUDA-graph
  padding) writes nothing.
* ``_mla_decode_split_kernel`` (one query token per sequence): grid (num_seqs, cdiv(H, BLOCK_H),
  num_splits). A program owns BLOCK_H heads of one sequence: it loads their q_lat [BLOCK_H, R] and q_pe
  [BLOCK_H, P] once, then walks its range of KV tiles; each tile of BLOCK_N cached rows is loaded ONCE and
  serves every head of the program twice, as the key (scores = q_lat c^T + q_pe k_pe^T) and as the value
  (acc += p c): MLA is multi-query attention whose value is the key's first R numbers. fp32 online softmax
  (exp2, scale folded in). Splits write (max, sum, acc) to a workspace that triton_attention's reduce kernel
  combines (same layout); with one split the program writes the output directly.

CUDA graphs: no host sync and no decision from device values (num_splits comes from host-known shapes and
meta.max_seq_len, fixed at capture; any num_splits is correct for any seq_lens). Padding rows (seq_len 0)
give zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.triton_attention import (
    _LOG2E,
    _NEG_BIG,
    _decode_reduce_kernel,
    _dot_precision,
    _next_pow2,
    _num_sms,
    _upcast_dot,
    decode_num_splits,
)
from meshserve.kernels.triton_mla_pipelined import PIPELINED_TILE, attend_latent_range_pipelined
from meshserve.kernels.triton_mla_prefetch import attend_latent_range_prefetched, attend_loaded_tile
from meshserve.kernels.triton_mla_transposed import attend_latent_range_transposed

BLOCK_H = 16  # heads per program: tl.dot needs at least 16 rows
# the most KV splits decode_split_count picks (either rule): the reduce kernel compiles once per power of two
# up to it (SPLITS_PAD), which the start-up warm-up runs through (engine/eager_warmup.forced_decode_splits)
MLA_MAX_SPLITS = 64


@triton.jit
def _write_latent_kernel(
    c_ptr, pe_ptr, cache_ptr, slot_ptr,
    stride_ct, stride_pt, stride_slot,
    RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    r = tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)
    row = cache_ptr + slot.to(tl.int64) * stride_slot
    c = tl.load(c_ptr + t.to(tl.int64) * stride_ct + r, mask=r < RANK)
    tl.store(row + r, c.to(cache_ptr.dtype.element_ty), mask=r < RANK)
    pe = tl.load(pe_ptr + t.to(tl.int64) * stride_pt + p, mask=p < ROPE)
    tl.store(row + RANK + p, pe.to(cache_ptr.dtype.element_ty), mask=p < ROPE)


def write_latent(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor):
    """kv_c [T, R], k_pe [T, P] (last dims contiguous) into kv_cache [1, blocks, block_size, 1, R + P]."""
    num_tokens, rank = kv_c.shape
    rope = k_pe.shape[1]
    if num_tokens == 0:
        return
    assert kv_c.stride(1) == 1 and k_pe.stride(1) == 1 and kv_cache.is_contiguous()
    _write_latent_kernel[(num_tokens,)](
        kv_c, k_pe, kv_cache, slot_mapping, kv_c.stride(0), k_pe.stride(0), kv_cache.stride(2),
        RANK=rank, ROPE=rope, BLOCK_R=_next_pow2(rank), BLOCK_P=_next_pow2(rope),
    )


@triton.jit
def attend_latent_tile(
    ql, qp, acc, m_i, l_i, t, seq_len, bt_row, cache_ptr, r, r_mask, p, p_mask, scale_log2, stride_cb, stride_cs,
    RANK: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(acc, m_i, l_i) after KV tile t (tokens t * BLOCK_N ..) of one sequence's latent cache (block table row
    bt_row): scores from the latent (ql . c) and rope (qp . pe) parts, the latent rows as values."""
    kv_pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_valid = kv_pos < seq_len
    blk = tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
    row = cache_ptr + blk * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cs  # [BLOCK_N] row starts
    c = tl.load(row[:, None] + r[None, :], mask=kv_valid[:, None] & r_mask[None, :], other=0.0)
    pe = tl.load(row[:, None] + RANK + p[None, :], mask=kv_valid[:, None] & p_mask[None, :], other=0.0)
    return attend_loaded_tile(ql, qp, acc, m_i, l_i, c, pe, t, seq_len, scale_log2, BLOCK_N, DOT_PRECISION)


@triton.jit
def attend_latent_range(
    ql, qp, acc, m_i, l_i, t0, t1, seq_len, bt_row, cache_ptr, r, r_mask, p, p_mask, scale_log2, stride_cb, stride_cs,
    RANK: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PREFETCH: tl.constexpr, TRANSPOSED: tl.constexpr, PIPELINED: tl.constexpr,
):
    """(acc, m_i, l_i) after KV tiles t0 .. t1 - 1 of one sequence: tile by tile (attend_latent_tile), with
    PIPELINED the block ids a tile ahead so the pipeliner keeps tiles in flight (kernels/triton_mla_pipelined.py),
    with TRANSPOSED the tile as the dots' M side (kernels/triton_mla_transposed.py), or with PREFETCH each tile's
    loads issued one iteration ahead (kernels/triton_mla_prefetch.py)."""
    if PIPELINED:
        acc, m_i, l_i = attend_latent_range_pipelined(
            ql, qp, acc, m_i, l_i, t0, t1, seq_len, bt_row, cache_ptr, r, r_mask, p, p_mask, scale_log2,
            stride_cb, stride_cs, RANK, BLOCK_SIZE, BLOCK_N, DOT_PRECISION)
    elif TRANSPOSED:
        acc, m_i, l_i = attend_latent_range_transposed(
            ql, qp, acc, m_i, l_i, t0, t1, seq_len, bt_row, cache_ptr, r, r_mask, p, p_mask, scale_log2,
            stride_cb, stride_cs, RANK, BLOCK_SIZE, BLOCK_N, DOT_PRECISION)
    elif PREFETCH:
        acc, m_i, l_i = attend_latent_range_prefetched(
            ql, qp, acc, m_i, l_i, t0, t1, seq_len, bt_row, cache_ptr, r, r_mask, p, p_mask, scale_log2,
            stride_cb, stride_cs, RANK, BLOCK_SIZE, BLOCK_N, DOT_PRECISION)
    else:
        for t in range(t0, t1):
            acc, m_i, l_i = attend_latent_tile(ql, qp, acc, m_i, l_i, t, seq_len, bt_row, cache_ptr, r, r_mask, p,
                                               p_mask, scale_log2, stride_cb, stride_cs, RANK, BLOCK_SIZE, BLOCK_N,
                                               DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["num_splits", "stride_btb"])  # see triton_attention._decode_split_kernel
def _mla_decode_split_kernel(
    ql_ptr, qp_ptr, cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, ws_acc_ptr, ws_ml_ptr,
    scale_log2, num_splits,
    stride_qlt, stride_qlh, stride_qpt, stride_qph,
    stride_cb, stride_cs,
    stride_btb,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
    RANK: tl.constexpr, BLOCK_R: tl.constexpr, ROPE: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT_OUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, PREFETCH: tl.constexpr,
    TRANSPOSED: tl.constexpr, PIPELINED: tl.constexpr,
):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start

    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    # (a scalar bool & a tensor mask trips the interpreter, so fold "q_len > 0" into the head bound)
    h_valid = heads < NUM_HEADS * tl.minimum(tl.maximum(q_len, 0), 1)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < RANK
    p = tl.arange(0, BLOCK_P)
    p_mask = p < ROPE
    tok = q_start.to(tl.int64)
    ql = tl.load(ql_ptr + tok * stride_qlt + heads[:, None] * stride_qlh + r[None, :],
                 mask=h_valid[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_R]
    qp = tl.load(qp_ptr + tok * stride_qpt + heads[:, None] * stride_qph + p[None, :],
                 mask=h_valid[:, None] & p_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_P]
    if UPCAST_DOT:
        ql = ql.to(tl.float32)
        qp = qp.to(tl.float32)

    tile_hi = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(tile_hi, num_splits)
    t0 = split * per_split
    t1 = tl.minimum(t0 + per_split, tile_hi)

    m_i = tl.full([BLOCK_H], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)

    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    acc, m_i, l_i = attend_latent_range(ql, qp, acc, m_i, l_i, t0, t1, seq_len, bt_row, cache_ptr, r, r_mask, p,
                                        p_mask, scale_log2, stride_cb, stride_cs, RANK, BLOCK_SIZE, BLOCK_N,
                                        DOT_PRECISION, PREFETCH, TRANSPOSED, PIPELINED)

    if DIRECT_OUT:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(out_ptr + tok * stride_ot + heads[:, None] * stride_oh + r[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=h_valid[:, None] & r_mask[None, :])
    else:
        # the reduce kernel's layout: acc [B, H, S, BLOCK_R], ml [B, H, S, 2] (max in log2 units, sum), fp32
        ws_row = (b.to(tl.int64) * NUM_HEADS + heads) * num_splits + split  # [BLOCK_H]
        tl.store(ws_acc_ptr + ws_row[:, None] * BLOCK_R + r[None, :], acc, mask=h_valid[:, None])
        tl.store(ws_ml_ptr + ws_row * 2, m_i, mask=h_valid)
        tl.store(ws_ml_ptr + ws_row * 2 + 1, l_i, mask=h_valid)


def _decode_config(block_r: int, elem_size: int, programs: int = 0, num_sms: int = 1) -> tuple[int, int]:
    """(BLOCK_N, num_warps): the latent tile [BLOCK_N, BLOCK_R] is the big load (512 x 2 B rows for
    DeepSeek: 32 rows = 32 KB, a few stages fit in shared memory). Warps: 8 for a wide acc [16, BLOCK_R] while
    the grid (programs) is under one wave of SMs, 4 from there on: H200, V2-Lite (tools/bench_mla_decode.py,
    2026-12-01): batch 1 (16 programs) 13.2 us with 8, 13.6 with 4; batch 64 (256 programs) 43.0 -> 39.5,
    batch 256 154.9 -> 102.6 (more programs per SM hide each other's loads; the [16, 32] scores have too few
    mma columns for 8 warps)."""
    row_bytes = block_r * elem_size
    block_n = 64 if row_bytes <= 256 else 32 if row_bytes <= 1024 else 16
    if block_r < 256:
        return block_n, 4
    return block_n, 4 if programs >= num_sms else 8


def mla_num_splits(num_seqs: int, max_seq_len: int, block_n: int, num_sms: int, max_splits: int = 64,
                   min_tokens_per_split: int = 256) -> int:
    """KV splits per sequence from host-known shapes (fixed in a CUDA graph; any count is correct for any
    seq_lens). A program holds every head of a sequence (16 for V2-Lite, so one program per sequence), which
    leaves SMs idle whenever the batch is under the SM count: the generic rule (decode_num_splits) splits only
    below half the SMs, so batches of 67-131 on an H200 ran one program per sequence on part of the GPU.
    Here: about two programs per SM while the batch is under one per SM, one split from there on. A split
    costs H x R x 4 B of workspace (32 KB for V2-Lite: ~3% of an 800-token context's 0.9 MB of latents), so
    splitting is cheap; a power of two keeps the captured shapes few."""
    if num_seqs >= num_sms:
        return 1
    want = -(-2 * num_sms // max(1, num_seqs))
    by_len = max(1, -(-max(1, max_seq_len) // max(block_n, min_tokens_per_split)))
    n = max(1, min(want, by_len, max_splits))
    return 1 << (n.bit_length() - 1)


def decode_split_count(num_seqs: int, num_heads: int, rank: int, elem_size: int, max_seq_len: int,
                       device_index: int | None, tile: tuple[int, int, int] | None = None,
                       legacy: bool = False) -> int:
    """The KV splits mla_decode runs for this batch shape when not told (engine/cuda_graph.py keys its
    short-context graph variants by it): mla_num_splits over (sequence, head block) programs, or with legacy
    the generic decode_num_splits (the rule before 2026-11-30)."""
    block_n = tile[0] if tile is not None else _decode_config(max(16, _next_pow2(rank)), elem_size)[0]
    programs_per_seq = triton.cdiv(num_heads, BLOCK_H)
    if legacy:
        return decode_num_splits(num_seqs, programs_per_seq, max_seq_len, block_n, _num_sms(device_index),
                                 max_splits=MLA_MAX_SPLITS)
    return mla_num_splits(num_seqs * programs_per_seq, max_seq_len, block_n, _num_sms(device_index),
                          max_splits=MLA_MAX_SPLITS)


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, max_seq_len: int,
               num_splits: int | None = None, tile: tuple[int, int, int] | None = None,
               legacy_splits: bool = False, prefetch: bool = False, transposed: bool = False,
               pipelined: bool = False) -> torch.Tensor:
    """mla_decode_ref for one query token per sequence: q_lat [T, H, R], q_pe [T, H, P] -> o_lat [T, H, R]
    (rows of q_len-0 sequences stay unwritten). No host syncs: safe to capture in a CUDA graph.

    num_splits: fixed KV splits (None: mla_num_splits, or with legacy_splits the generic decode_num_splits,
    the rule before 2026-11-30); tile: (BLOCK_N, num_warps, num_stages) instead of _decode_config's; prefetch:
    the tile loop that loads a tile ahead (kernels/triton_mla_prefetch.py; num_stages 1 unless tile says);
    transposed: the loop with the tile as the dots' M side (kernels/triton_mla_transposed.py; BLOCK_N 64 unless
    tile says; over prefetch); pipelined: the loop with the block ids a tile ahead (kernels/triton_mla_pipelined.py;
    num_stages 3 unless tile says; over both)."""
    num_tokens, num_heads, rank = q_lat.shape
    rope = q_pe.shape[2]
    out = torch.empty_like(q_lat)
    if num_tokens == 0:
        return out
    assert q_lat.stride(2) == 1 and q_pe.stride(2) == 1 and kv_cache.stride(4) == 1
    assert kv_cache.shape[-1] == rank + rope, "cache rows are [latent, rotary key]"
    num_seqs, block_size = seq_lens.shape[0], kv_cache.shape[2]
    block_r, block_p = max(16, _next_pow2(rank)), max(16, _next_pow2(rope))
    head_blocks = triton.cdiv(num_heads, BLOCK_H)
    dev = q_lat.device.index if q_lat.device.type == "cuda" else None
    if num_splits is None:
        num_splits = decode_split_count(num_seqs, num_heads, rank, q_lat.element_size(), max_seq_len, dev, tile,
                                        legacy_splits)
    num_splits = max(1, int(num_splits))
    # (legacy: the tile before 2026-12-01, 8 warps whatever the grid)
    programs = 0 if legacy_splits else num_seqs * head_blocks * num_splits
    block_n, num_warps = _decode_config(block_r, q_lat.element_size(), programs, _num_sms(dev))
    num_stages = 1 if prefetch else 2  # (the hand-pipelined loop needs no pipeliner)
    if transposed:
        prefetch, block_n, num_warps, num_stages = False, 64, 4, 2  # wgmma: M >= 64 for one warpgroup
    if pipelined:  # the split kernel's tile, with the stages that give the latent tile two buffers
        prefetch, transposed, num_stages = False, False, PIPELINED_TILE[2]
    if tile is not None:
        block_n, num_warps, num_stages = tile
    direct = num_splits == 1
    if direct:
        ws_acc = ws_ml = out  # unused
    else:
        ws_acc = torch.empty((num_seqs, num_heads, num_splits, block_r), dtype=torch.float32, device=q_lat.device)
        ws_ml = torch.empty((num_seqs, num_heads, num_splits, 2), dtype=torch.float32, device=q_lat.device)
    _mla_decode_split_kernel[(num_seqs, head_blocks, num_splits)](
        q_lat, q_pe, kv_cache, block_tables, seq_lens, query_start_loc, out, ws_acc, ws_ml,
        scale * _LOG2E, num_splits,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(1), kv_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, BLOCK_H=BLOCK_H, RANK=rank, BLOCK_R=block_r, ROPE=rope, BLOCK_P=block_p,
        BLOCK_SIZE=block_size, BLOCK_N=block_n,
        DIRECT_OUT=direct, UPCAST_DOT=_upcast_dot(q_lat), DOT_PRECISION=_dot_precision(q_lat), PREFETCH=prefetch,
        TRANSPOSED=transposed, PIPELINED=pipelined, num_warps=num_warps, num_stages=num_stages,
    )
    if not direct:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            ws_acc, ws_ml, query_start_loc, out, num_splits,
            out.stride(0), out.stride(1), out.stride(2),
            NUM_HEADS=num_heads, HEAD_DIM=rank, BLOCK_D=block_r, SPLITS_PAD=_next_pow2(num_splits),
            num_warps=4,  # USE_GDC left False: the MLA split kernel before it launches without PDL (kernels/pdl.py)
        )
    return out
