"""Persistent unified attention: a fixed number of programs walk a device-built list of the step's query tiles.

Why: the grid kernel (triton_unified_attention._unified_attention_kernel) launches cdiv(T, BLOCK_Q) + S
programs per KV head. In issue 18's mixed step (1,014 prompt tokens + 254 decode rows, bucket T 1,280, S 256)
that is 296 x 8 programs of which 256 do work: the rest each pay a CTA launch, a binary search of dependent
loads and (at one CTA per SM, the smem of a 128-row tile) a whole SM, and the causal tiles run in launch
order, the heaviest last. Here:

* ``_unified_work_kernel`` (one program, once per step: the backend memoizes it in meta.step_memo, so a
  captured graph replays it before the first layer) lists the (sequence, q-tile) items with work, packed as
  seq << 16 | tile, heaviest first: by the tile's last key position in BLOCK_Q units (its cached prefix plus
  its place in the chunk), one pass per level, sequences in order within a level. work[0] is the count.
* ``_unified_persistent_kernel``: grid min(SMs x programs_per_sm, items x Hkv), fixed by the bucket. Program p
  zeroes its share of the rows past query_start_loc[S], then takes one unit (item x KV head, the head
  fastest) per round of P units in snake order (forwards, then backwards): with the list sorted heaviest
  first, each program's total is near the mean. Issue 18's 1,014-token prompt is 256 units on 132 SMs: a
  plain round robin would give program 0 levels 31 + 15 (in BLOCK_Q units of KV), the snake ~31 + 0 for it
  and about 30 for every program.
  Each item is attend_causal_q_tile, the prefill and grid kernels' body.

Semantics, padding and graph safety are the grid kernel's (see triton_unified_attention.py); sequences with
one new token are left out of the list with skip_single (the decode kernel's rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.attention_tile_config import AttentionTileConfig
from meshserve.kernels.triton_attention import _num_sms, attend_causal_q_tile

_TILE_BITS = 16  # a work item: seq << 16 | q-tile (a bucket's q-tiles and sequences stay below 2**15)


@triton.jit(do_not_specialize=["num_seqs"])  # per-step counts (triton_unified_attention)
def _unified_work_kernel(
    qsl_ptr,
    seq_lens_ptr,
    work_ptr,
    num_seqs,
    SEQS_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    SKIP_SINGLE: tl.constexpr,
):
    s = tl.arange(0, SEQS_PAD)
    valid = s < num_seqs
    q_start = tl.load(qsl_ptr + s, mask=valid, other=0).to(tl.int32)
    q_len = tl.load(qsl_ptr + s + 1, mask=valid, other=0).to(tl.int32) - q_start
    if SKIP_SINGLE:
        q_len = tl.where(q_len == 1, 0, q_len)
    n_tiles = (q_len + BLOCK_Q - 1) // BLOCK_Q
    prefix = tl.load(seq_lens_ptr + s, mask=valid, other=0).to(tl.int32) - q_len
    # level of tile j: (prefix + last token of the tile) // BLOCK_Q = lvl0 + j; one item per sequence per level
    lvl0 = prefix // BLOCK_Q
    top = tl.max(tl.where(n_tiles > 0, lvl0 + n_tiles, 0), 0)
    # from the lowest level with an item: a chunk behind a long cached prefix costs its own tiles, not the prefix
    bottom = tl.min(tl.where(n_tiles > 0, lvl0, top), 0)
    count = top * 0
    for i in range(top - bottom):
        j = top - 1 - i - lvl0
        has = (j >= 0) & (j < n_tiles)
        has_i = has.to(tl.int32)
        pos = count + tl.cumsum(has_i, 0) - has_i
        tl.store(work_ptr + 1 + pos, (s << 16) | j, mask=has)
        count += tl.sum(has_i, 0)
    tl.store(work_ptr, count)


# per-step counts and block-table width unspecialized: see triton_unified_attention._unified_attention_kernel
@triton.jit(do_not_specialize=["num_tokens", "num_seqs", "stride_btb"])
def _unified_persistent_kernel(
    q_ptr,
    cache_ptr,
    bt_ptr,
    seq_lens_ptr,
    qsl_ptr,
    work_ptr,
    out_ptr,
    num_tokens,
    num_seqs,
    num_kv_heads,
    scale_log2,
    window,
    k_scale,
    v_scale,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ckv,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    stride_btb,
    stride_ot,
    stride_oh,
    stride_od,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
    DIAG_MASK_ONLY: tl.constexpr,
    V_T: tl.constexpr = False,
):
    ROWS: tl.constexpr = BLOCK_Q * GROUP_PAD
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    rows = tl.arange(0, ROWS)
    g = rows % GROUP_PAD
    d = tl.arange(0, BLOCK_D)

    # rows that belong to no sequence (at or past qsl[S]) get zeros: BLOCK_Q tokens x one KV head's heads each
    num_real_tokens = tl.load(qsl_ptr + num_seqs).to(tl.int32)
    pad_tiles = tl.cdiv(num_tokens - num_real_tokens, BLOCK_Q)
    for w in range(pid, pad_tiles * num_kv_heads, num_programs):
        tok = num_real_tokens + (w // num_kv_heads) * BLOCK_Q + rows // GROUP_PAD
        heads = (w % num_kv_heads) * GROUP + g
        tl.store(
            out_ptr
            + tok.to(tl.int64)[:, None] * stride_ot
            + heads[:, None] * stride_oh
            + d[None, :] * stride_od,
            tl.zeros([ROWS, BLOCK_D], dtype=out_ptr.dtype.element_ty),
            mask=((tok < num_tokens) & (g < GROUP))[:, None] & (d < HEAD_DIM)[None, :],
        )

    # snake order: round r takes units r * P .. r * P + P - 1, forwards on even rounds and backwards on odd
    # ones, so with the list sorted heaviest first the program given a round's heaviest unit gets the next
    # round's lightest (a plain round robin gives program 0 the heaviest of every round)
    total = tl.load(work_ptr) * num_kv_heads
    for r in range(tl.cdiv(total, num_programs)):
        w = r * num_programs + tl.where(r % 2 == 0, pid, num_programs - 1 - pid)
        if w < total:
            item = tl.load(work_ptr + 1 + w // num_kv_heads)
            kvh = w % num_kv_heads
            s = item >> 16
            q_start = tl.load(qsl_ptr + s).to(tl.int32)
            q_len = tl.load(qsl_ptr + s + 1).to(tl.int32) - q_start
            prefix = tl.load(seq_lens_ptr + s).to(tl.int32) - q_len
            attend_causal_q_tile(
                q_ptr,
                cache_ptr,
                bt_ptr,
                out_ptr,
                s,
                kvh,
                q_start,
                q_len,
                (item & 0xFFFF) * BLOCK_Q,
                prefix,
                scale_log2,
                window,
                k_scale,
                v_scale,
                stride_qt,
                stride_qh,
                stride_qd,
                stride_ckv,
                stride_cb,
                stride_cs,
                stride_ch,
                stride_cd,
                stride_btb,
                stride_ot,
                stride_oh,
                stride_od,
                GROUP,
                GROUP_PAD,
                BLOCK_Q,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_SIZE,
                BLOCK_N,
                USE_WINDOW,
                UPCAST_DOT,
                DOT_PRECISION,
                KV_FP8,
                DIAG_MASK_ONLY,
                V_T,
            )


def max_work_items(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Items a (T, S) bucket can list: each sequence's tiles, at most one partial tile per sequence."""
    return triton.cdiv(num_tokens, block_q) + num_seqs


def work_list_width(num_seqs: int) -> int:
    """The work kernel's sequence vector (a constexpr): at least 256 (the default max_num_seqs, which the
    mixed-step graphs capture), so eager steps of any smaller batch reuse that one compile instead of building
    one per power of two of their batch inside serving."""
    return triton.next_power_of_2(max(num_seqs, 256))


def build_unified_work(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int, block_q: int, skip_single: bool
) -> torch.Tensor:
    """The step's work list (int32 [1 + max items]: count, then seq << 16 | q-tile, heaviest first), built on
    the device without a sync; its size depends only on the bucket."""
    num_seqs = seq_lens.shape[0]
    assert num_seqs < 1 << 15 and triton.cdiv(num_tokens, block_q) < 1 << _TILE_BITS
    work = torch.empty(
        1 + max_work_items(num_tokens, num_seqs, block_q), dtype=torch.int32, device=seq_lens.device
    )
    _unified_work_kernel[(1,)](
        query_start_loc,
        seq_lens,
        work,
        num_seqs,
        SEQS_PAD=work_list_width(num_seqs),
        BLOCK_Q=block_q,
        SKIP_SINGLE=skip_single,
        num_warps=4,
    )
    return work


def persistent_grid(
    num_tokens: int,
    num_seqs: int,
    num_kv_heads: int,
    block_q: int,
    programs_per_sm: int,
    device: torch.device,
) -> tuple[int]:
    """min(SMs x programs_per_sm, most items x KV heads): fixed by the bucket and the GPU."""
    num_sms = _num_sms(device.index if device.type == "cuda" else None)
    return (
        max(1, min(num_sms * programs_per_sm, max_work_items(num_tokens, num_seqs, block_q) * num_kv_heads)),
    )


def launch_unified_persistent(
    query,
    kv_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    work,
    out,
    scale_log2,
    window,
    k_scale,
    v_scale,
    config: AttentionTileConfig,
    kernel_args: dict,
):
    """Launch the persistent kernel on a work list from build_unified_work (same block_q)."""
    num_tokens = query.shape[0]
    num_kv_heads = kv_cache.shape[3]
    num_seqs = seq_lens.shape[0]
    grid = persistent_grid(
        num_tokens, num_seqs, num_kv_heads, config.block_q, config.programs_per_sm, query.device
    )
    _unified_persistent_kernel[grid](
        query,
        kv_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        work,
        out,
        num_tokens,
        num_seqs,
        num_kv_heads,
        scale_log2,
        window,
        k_scale,
        v_scale,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        kv_cache.stride(4),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BLOCK_Q=config.block_q,
        BLOCK_N=config.block_n,
        DIAG_MASK_ONLY=config.diag_mask_only,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **kernel_args,
    )
    return out
