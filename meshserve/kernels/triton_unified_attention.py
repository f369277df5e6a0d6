"""Unified paged attention for CUDA-graph-bound mixed batches (prefill chunks + decode rows in one launch).

The same semantics as ``triton_attention.prefill_attention`` (and the torch reference
``attention_ref.paged_attention_ref``), but the launch grid depends only on static shapes: T query tokens,
S sequences (rows of block_tables / seq_lens) and the number of KV heads. It never reads max_query_len or any
other per-step host number, and does no host sync, so one CUDA graph captured at a (T, S) bucket is right
for every batch that fits in it.

Two launches of the same tile body (attend_causal_q_tile), chosen by the tiling (attention_tile_config):
the persistent kernel of triton_unified_persistent.py (the default: a fixed number of programs walk a work
list built on the device once per step, heaviest tiles first), and the grid kernel below (one program per
q-block slot, most of which exit at once in a step of many decode rows), kept for A/B runs
(MESHSERVE_UNIFIED_TILE=grid_bq32_bn64_w8_s3_allmask is the launch before the persistent one).

Grid and q-block mapping (the grid kernel)
------------------------------------------
grid = (cdiv(T, BLOCK_Q) + S, num_kv_heads). With a = query_start_loc, sequence s owns the q-blocks
[a[s] // BLOCK_Q + s, a[s+1] // BLOCK_Q + s + 1): the start index a[s] // BLOCK_Q + s is strictly increasing
in s (so the ranges tile [0, a[S] // BLOCK_Q + S) without gaps or overlaps) and each range holds
a[s+1] // BLOCK_Q - a[s] // BLOCK_Q + 1 >= cdiv(q_len, BLOCK_Q) blocks (floor is superadditive). A program b
finds its sequence by binary search over a (the largest s whose start is <= b); its local block
j = b - start(s) covers query tokens j * BLOCK_Q .. of s and exits at once when that is past q_len (the
spare block of each range, q_len-0 padding sequences, and blocks past a[S] // BLOCK_Q + S). That costs at most
S + cdiv(T, BLOCK_Q) programs per KV head, instead of S x cdiv(T, BLOCK_Q) for a grid per (sequence, q-tile).

Padding (as MixedStepGraphs lays it out): padding sequences have q_len 0 (query_start_loc repeats its last
value) and seq_len 0; tokens at or after query_start_loc[S] belong to no sequence. The kernel writes zeros to
those rows of ``out`` (the program of flat block b zeroes its tokens past a[S] before doing its attention
work), so padded rows stay finite through the rest of the model and the caller need not clear them.

Each program attends BLOCK_Q query tokens x the G = H / Hkv query heads of its KV head (packed as in the
prefill kernel: row r = token r // G_PAD, head r % G_PAD) over the causal prefix, reading KV through the
block table, with the prefill kernel's fp32 online softmax, fp8 KV scales, sliding window and dot precision.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from meshserve.kernels.attention_tile_config import (
    AttentionTileConfig,
    clamp_block_q,
    default_tile_config,
    env_tile_config,
)
from meshserve.kernels.kv_layout import v_transposed
from meshserve.kernels.triton_attention import (
    _LOG2E,
    _dot_precision,
    _is_fp8,
    _next_pow2,
    _prefill_config,
    _upcast_dot,
    attend_causal_q_tile,
)
from meshserve.kernels.triton_unified_persistent import build_unified_work, launch_unified_persistent

_ENV_TILE = env_tile_config()  # read once: an A/B override of the default tiling (attention_tile_config)


@triton.jit
def _seq_of_q_block(qsl_ptr, num_seqs, search_steps, b, BLOCK_Q: tl.constexpr):
    """The sequence s owning q-block b: the largest s < num_seqs with qsl[s] // BLOCK_Q + s <= b (s = 0
    always qualifies). A fixed number of halvings (search_steps = ceil(log2(num_seqs)), from the static S),
    branch-free; once lo == hi a step leaves both unchanged."""
    lo = tl.program_id(0) * 0  # an int32 tensor from the start: a loop-carried value keeps one type
    hi = lo + num_seqs - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        owns = tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= b
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid - 1)
    return lo


# Triton compiles a copy of a kernel per "specialization" of its integer arguments (== 1, a multiple of 16). The
# counts below and the block table's row stride (its width: the step's longest sequence) change with every eager
# mixed step, so each new combination compiled inside the timed W2 run on an H200 (4 copies, ~0.8 s each with a
# cold Triton cache: 9.4 s instead of 6.0 s; tools/w2_jit_probe.sh). They only bound loops and masks and index
# scalar loads, so nothing is lost by leaving them unspecialized.
@triton.jit(do_not_specialize=["num_tokens", "num_seqs", "search_steps", "stride_btb"])
def _unified_attention_kernel(
    q_ptr,
    cache_ptr,
    bt_ptr,
    seq_lens_ptr,
    qsl_ptr,
    out_ptr,
    num_tokens,
    num_seqs,
    search_steps,
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
    SKIP_SINGLE: tl.constexpr,
    DIAG_MASK_ONLY: tl.constexpr = False,
    V_T: tl.constexpr = False,
):
    ROWS: tl.constexpr = BLOCK_Q * GROUP_PAD
    b = tl.program_id(0)
    kvh = tl.program_id(1)

    rows = tl.arange(0, ROWS)
    g = rows % GROUP_PAD
    heads = kvh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM

    # rows of flat block b that belong to no sequence (at or past qsl[S]) get zeros
    num_real_tokens = tl.load(qsl_ptr + num_seqs)
    flat_start = b * BLOCK_Q
    if (flat_start + BLOCK_Q > num_real_tokens) & (flat_start < num_tokens):
        flat_tok = flat_start + rows // GROUP_PAD
        pad_row = (flat_tok >= num_real_tokens) & (flat_tok < num_tokens) & (g < GROUP)
        tl.store(
            out_ptr
            + flat_tok.to(tl.int64)[:, None] * stride_ot
            + heads[:, None] * stride_oh
            + d[None, :] * stride_od,
            tl.zeros([ROWS, BLOCK_D], dtype=out_ptr.dtype.element_ty),
            mask=pad_row[:, None] & d_mask[None, :],
        )

    s = _seq_of_q_block(qsl_ptr, num_seqs, search_steps, b, BLOCK_Q)
    q_start = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q_start
    q_tile_start = (b - (q_start // BLOCK_Q + s)) * BLOCK_Q
    if q_tile_start >= q_len:  # the spare block of each range, q_len-0 sequences, blocks past the end
        return
    if SKIP_SINGLE:  # noqa: SIM102 (Triton: a constexpr `and` a tensor does not compile)
        if q_len == 1:  # one-token rows are the decode kernel's (TritonAttentionBackend.attend)
            return
    seq_len = tl.load(seq_lens_ptr + s)
    prefix = seq_len - q_len

    attend_causal_q_tile(
        q_ptr, cache_ptr, bt_ptr, out_ptr, s, kvh, q_start, q_len, q_tile_start, prefix,
        scale_log2, window, k_scale, v_scale,
        stride_qt, stride_qh, stride_qd, stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd, stride_btb,
        stride_ot, stride_oh, stride_od,
        GROUP, GROUP_PAD, BLOCK_Q, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N,
        USE_WINDOW, UPCAST_DOT, DOT_PRECISION, KV_FP8, DIAG_MASK_ONLY, V_T,
    )  # fmt: skip


def unified_block_q(head_dim: int, group: int) -> int:
    """Query tokens per program: the prefill kernel's tile for this head_dim and GQA group at long chunks
    (never from a per-step max_query_len, which a captured graph cannot follow)."""
    block_d = max(16, _next_pow2(head_dim))
    return _prefill_config(block_d, _next_pow2(group), 1 << 30)[0]


def binary_search_steps(num_seqs: int) -> int:
    """Halvings that take the binary search over num_seqs sequences down to one."""
    return max(0, int(num_seqs) - 1).bit_length()


def unified_grid(num_tokens: int, num_seqs: int, num_kv_heads: int, block_q: int) -> tuple[int, int]:
    """(q-block programs, KV heads): every sequence's tiles fit in cdiv(T, BLOCK_Q) + S programs."""
    return triton.cdiv(num_tokens, block_q) + num_seqs, num_kv_heads


def unified_config(
    head_dim: int, group: int, block_q: int | None = None, config: AttentionTileConfig | None = None
) -> AttentionTileConfig:
    """The tiling unified_attention launches: config, else the default (attention_tile_config) with block_q
    overriding the tile height (clamped like the prefill tile: 16..128 rows, a power of two)."""
    group_pad = _next_pow2(group)
    if config is None and block_q is None:
        config = _ENV_TILE
    if config is None:
        block_d = max(16, _next_pow2(head_dim))
        config = default_tile_config(block_d, group_pad, block_q or 1 << 30)
    return clamp_block_q(config, group_pad)


def unified_work(meta, num_tokens: int, config: AttentionTileConfig, skip_single: bool):
    """The persistent kernel's work list for this step, built by the first layer and shared by the rest
    (meta.step_memo). Under graph capture the build is captured once, before the first layer's attention; the
    capturing flag is in the key because MixedStepGraphs warms up eagerly on the same metadata object, and a
    list built then would be baked into the graph as a constant instead of rebuilt at each replay."""
    capturing = _capturing(meta.query_start_loc)
    key = ("unified_work", num_tokens, config.block_q, skip_single, capturing)
    if key not in meta.step_memo:
        meta.step_memo[key] = build_unified_work(
            meta.query_start_loc, meta.seq_lens, num_tokens, config.block_q, skip_single
        )
    return meta.step_memo[key]


def _capturing(t) -> bool:
    """Whether t's device stream is being captured into a CUDA graph."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def unified_attention(
    query,
    kv_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    scale,
    sliding_window,
    out,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    block_q: int | None = None,
    skip_single: bool = False,
    config: AttentionTileConfig | None = None,
    work=None,
):
    """Causal paged attention of a padded mixed batch into out [T, H, D], graph-capture safe.

    query [T, H, D]; block_tables [S, W]; seq_lens [S]; query_start_loc [S+1] (non-decreasing, from 0).
    Rows of out at or past query_start_loc[S] are zeroed. block_q overrides the default tile height (tuning;
    at most unified_block_q, at least 16 rows); config sets the whole tiling (attention_tile_config).
    skip_single: leave sequences with one new token (a mixed batch's decode rows) to decode_attention, which
    then serves them. work: the persistent kernel's list from build_unified_work for this config and
    skip_single (unified_work memoizes it per step); None builds it here.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0:
        return out
    if num_seqs == 0:
        return out.zero_()
    group = num_heads // num_kv_heads
    group_pad = _next_pow2(group)
    block_d = max(16, _next_pow2(head_dim))
    config = unified_config(head_dim, group, block_q, config)
    if query.element_size() == 4:  # fp32 tiles: less smem
        config = replace(config, num_stages=min(config.num_stages, 2))
    use_window = sliding_window is not None and sliding_window > 0
    kernel_args = {
        "GROUP": group,
        "GROUP_PAD": group_pad,
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d,
        "BLOCK_SIZE": block_size,
        "USE_WINDOW": use_window,
        "UPCAST_DOT": _upcast_dot(query),
        "DOT_PRECISION": _dot_precision(query),
        "KV_FP8": _is_fp8(kv_cache),
        "V_T": v_transposed(kv_cache),
    }
    window = int(sliding_window) if use_window else 0
    if config.persistent:
        if work is None:
            work = build_unified_work(query_start_loc, seq_lens, num_tokens, config.block_q, skip_single)
        return launch_unified_persistent(
            query,
            kv_cache,
            block_tables,
            seq_lens,
            query_start_loc,
            work,
            out,
            scale * _LOG2E,
            window,
            float(k_scale),
            float(v_scale),
            config,
            kernel_args,
        )
    _unified_attention_kernel[unified_grid(num_tokens, num_seqs, num_kv_heads, config.block_q)](
        query,
        kv_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        num_tokens,
        num_seqs,
        binary_search_steps(num_seqs),
        scale * _LOG2E,
        window,
        float(k_scale),
        float(v_scale),
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
        SKIP_SINGLE=skip_single,
        DIAG_MASK_ONLY=config.diag_mask_only,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **kernel_args,
    )
    return out
