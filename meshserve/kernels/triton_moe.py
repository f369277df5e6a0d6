"""Fused mixture-of-experts on the GPU: the same signature and math as kernels/moe_ref.py.

Large batches (grouped GEMMs):
  1. align: the (token, slot) pairs are sorted by expert and each expert's run is padded to a multiple of
     BLOCK_M (torch ops of static shape: no host sync, so it can sit in a CUDA graph), and every block of
     BLOCK_M rows gets its expert's id
  2. one grouped GEMM for gate and up together, SiLU(gate) * up fused in its epilogue -> [pairs, width]
  3. one grouped GEMM for down, the routing weight applied in its epilogue -> [pairs, hidden]
  4. the weighted combine: each token's K rows summed in float32
With configs="tuned" (the default) step 1 is triton_moe_align's three launches, step 4 one launch (_combine_kernel,
which skips -1 pairs, so the down output needs no zeroing) and the tile shapes kernels/moe_configs.py's tuned
table; configs="legacy" is the first version (torch align, zero + sum + cast, the legacy table), kept for A/B.
Small batches (one token, or a few among many experts): one program per (pair, column tile) computes a GEMV
against only that pair's expert, so a decode step reads just the chosen experts' weights and skips the sort.

FP8 experts (kernels/moe_ref.py has the layouts; QUANT below): each GEMM's input is quantized first, in its own
small pass (the kernels would otherwise redo it for every column tile), and both operands stay fp8:
  QUANT 1  per-channel weight scales, per-token activation scales: the fp8 x fp8 products accumulate in fp32
           and are scaled once, at the end, by the row's and the column's scale
  QUANT 2  128 x 128 weight blocks, activations per 1 x 128 group (triton_fp8_block's quantization): BLOCK_K is
           the block's K, and each K step's partial sum is scaled by its activation and weight scales before
           it joins the accumulator (as triton_fp8_block's dense GEMM does)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from meshserve.kernels import triton_moe_align
from meshserve.kernels.moe_configs import StageConfigs, stage_configs, use_pair_gemv
from meshserve.kernels.quant_ref import quantize_fp8_per_token

NO_QUANT, PER_CHANNEL, BLOCKWISE = 0, 1, 2


@triton.jit
def _expert_weights(b_ptr, sb_ptr, expert, num_routed, N, stride_be, stride_bn, stride_sbe, stride_sbn,
                    shared_up, HAS_SHARED: tl.constexpr):
    """(base pointer, row stride, offset of the up rows) of `expert`'s weights. With HAS_SHARED, ids from
    num_routed on are slices of the shared MLP read in its own layout (shared_up: its up rows' offset; a
    select, not a branch, so the pointers keep their alignment for vector loads); else the stacked experts."""
    if HAS_SHARED:
        shared = expert >= num_routed
        base = tl.where(shared, sb_ptr + (expert - num_routed) * stride_sbe, b_ptr + expert * stride_be)
        stride_n = tl.where(shared, stride_sbn, stride_bn)
        up_offset = tl.where(shared, shared_up, N * stride_bn)
    else:
        base, stride_n, up_offset = b_ptr + expert * stride_be, stride_bn, N * stride_bn
    return base, stride_n, up_offset


@triton.jit(do_not_specialize=["num_pairs", "num_rows_padded"])  # per-step counts (triton_unified_attention)
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_rows_ptr, block_expert_ptr, num_padded_ptr,
    as_ptr, bs_ptr,  # fp8 only: activation scales [rows of A, K groups], weight scales [E, N or N blocks, ...]
    N, K, num_pairs, num_rows_padded, up_scale_row,  # up_scale_row: up's first scale row (gated fp8)
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_bse, stride_bsn, stride_bsk,
    sb_ptr, num_routed, stride_sbe, stride_sbn, shared_up,  # HAS_SHARED only (_expert_weights)
    QUANT: tl.constexpr, BLOCK_SCALE_N: tl.constexpr, HAS_SHARED: tl.constexpr,
    A_ROWS_PER_TOKEN: tl.constexpr,  # top_k when A holds one row per token (gate/up), 1 per pair (down)
    GATED: tl.constexpr,  # B rows [0, N) are gate, [N, 2N) up: store silu(gate) * up
    MUL_WEIGHT: tl.constexpr,  # scale each row by its pair's routing weight
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: neighbouring programs share B tiles of one expert (L2 reuse)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_m
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_m
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the last expert's padded run
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_rows_ptr + offs_m).to(tl.int64)  # pair index t * top_k + k; num_pairs = padding
    row_ok = rows < num_pairs
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = rows // A_ROWS_PER_TOKEN
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_base, stride_n, up_offset = _expert_weights(b_ptr, sb_ptr, expert, num_routed, N, stride_be, stride_bn,
                                                  stride_sbe, stride_sbn, shared_up, HAS_SHARED)
    b_ptrs = b_base + offs_n[None, :] * stride_n + offs_k[:, None] * stride_bk
    # fp8: the scales of this tile's rows, and of its columns (gate, and up at up_scale_row on)
    a_scales = as_ptr + a_rows * stride_asm
    scale_col = offs_n // BLOCK_SCALE_N  # 1 for per-channel scales
    b_scales = bs_ptr + expert * stride_bse + scale_col * stride_bsn
    b_scales_up = b_scales + up_scale_row * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if QUANT == 2:  # this K block's scales, on its partial sums
            kb = k0 // BLOCK_K
            sa = tl.load(a_scales + kb, mask=row_ok, other=0.0)[:, None]
            acc += tl.dot(a, b, out_dtype=tl.float32) * sa * tl.load(b_scales + kb * stride_bsk, mask=n_ok,
                                                                     other=0.0)[None, :]
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GATED:
            b_up = tl.load(b_ptrs + up_offset, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if QUANT == 2:
                acc_up += tl.dot(a, b_up, out_dtype=tl.float32) * sa * tl.load(
                    b_scales_up + kb * stride_bsk, mask=n_ok, other=0.0)[None, :]
            else:
                acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if QUANT == 1:  # per-channel: the scales once, on the fp32 sums
        sa = tl.load(a_scales, mask=row_ok, other=0.0)[:, None]
        acc = acc * sa * tl.load(b_scales, mask=n_ok, other=0.0)[None, :]
        if GATED:
            acc_up = acc_up * sa * tl.load(b_scales_up, mask=n_ok, other=0.0)[None, :]
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + rows, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _pair_gemv_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, ids_ptr, as_ptr, bs_ptr,
    N, K, up_scale_row,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_bse, stride_bsn, stride_bsk,
    sb_ptr, num_routed, stride_sbe, stride_sbn, shared_up,  # HAS_SHARED only (_expert_weights)
    QUANT: tl.constexpr, BLOCK_SCALE_N: tl.constexpr, HAS_SHARED: tl.constexpr,
    A_ROWS_PER_TOKEN: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if expert < 0:  # another rank's expert: this pair adds nothing
        tl.store(c_ptr + pair * stride_cm + offs_n * stride_cn, tl.zeros((BLOCK_N,), c_ptr.dtype.element_ty),
                 mask=n_ok)
        return
    offs_k = tl.arange(0, BLOCK_K)
    a_row = pair // A_ROWS_PER_TOKEN
    a_ptrs = a_ptr + a_row * stride_am + offs_k * stride_ak
    b_base, stride_n, up_offset = _expert_weights(b_ptr, sb_ptr, expert, num_routed, N, stride_be, stride_bn,
                                                  stride_sbe, stride_sbn, shared_up, HAS_SHARED)
    b_ptrs = b_base + offs_n[:, None] * stride_n + offs_k[None, :] * stride_bk
    a_scales = as_ptr + a_row * stride_asm
    scale_col = offs_n // BLOCK_SCALE_N  # 1 for per-channel scales
    b_scales = bs_ptr + expert * stride_bse + scale_col * stride_bsn
    b_scales_up = b_scales + up_scale_row * stride_bsn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if QUANT == 2:  # this K block's scales, on its partial sums
            kb = k0 // BLOCK_K
            sa = tl.load(a_scales + kb)
            acc += tl.sum(b * a[None, :], axis=1) * sa * tl.load(b_scales + kb * stride_bsk, mask=n_ok, other=0.0)
        else:
            acc += tl.sum(b * a[None, :], axis=1)
        if GATED:
            b_up = tl.load(b_ptrs + up_offset, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            if QUANT == 2:
                acc_up += tl.sum(b_up * a[None, :], axis=1) * sa * tl.load(b_scales_up + kb * stride_bsk,
                                                                           mask=n_ok, other=0.0)
            else:
                acc_up += tl.sum(b_up * a[None, :], axis=1)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if QUANT == 1:  # per-channel: the scales once, on the fp32 sums
        sa = tl.load(a_scales)
        acc = acc * sa * tl.load(b_scales, mask=n_ok, other=0.0)
        if GATED:
            acc_up = acc_up * sa * tl.load(b_scales_up, mask=n_ok, other=0.0)
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + pair)
    tl.store(c_ptr + pair * stride_cm + offs_n * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _combine_kernel(pairs_ptr, ids_ptr, out_ptr, hidden, stride_pm, stride_om,
                    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = the sum of token t's weighted down rows (ids of -1: never written, skipped), in fp32."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < hidden
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        pair = token * TOP_K + slot
        limit = tl.where(tl.load(ids_ptr + pair) >= 0, hidden, 0)
        acc += tl.load(pairs_ptr + pair * stride_pm + cols, mask=cols < limit, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Pairs grouped by expert, each expert's run padded to a multiple of block_m, in static shapes.

    Returns (sorted_rows [R] int32: pair indices, `pairs` marking padding; block_expert [R / block_m] int32;
    num_padded [1]: rows actually used). Pairs with expert id -1 are left out.
    """
    flat = topk_ids.reshape(-1).long()
    pairs = flat.numel()
    key = torch.where(flat >= 0, flat, num_experts)  # -1 sorts after every expert and is dropped
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    run_start = torch.cumsum(counts, 0) - counts
    rank_in_run = torch.arange(pairs, device=flat.device) - run_start[sorted_key]
    rows_padded = triton.cdiv(pairs + num_experts * (block_m - 1), block_m) * block_m
    expert_of = sorted_key.clamp(max=num_experts - 1)
    dest = torch.where(sorted_key < num_experts, padded_end[expert_of] - padded[expert_of] + rank_in_run,
                       rows_padded)  # dropped pairs land in one spare slot past the end
    sorted_rows = torch.full((rows_padded + 1,), pairs, dtype=torch.int32, device=flat.device)
    sorted_rows.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, rows_padded, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).clamp(max=num_experts - 1)
    return sorted_rows[:rows_padded], block_expert.to(torch.int32), padded_end[-1:]


def _quantize_rows(a: torch.Tensor, quant: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A GEMM input as fp8 with its scales: per row (per-channel weights) or per row and block_k features."""
    if quant == PER_CHANNEL:
        return quantize_fp8_per_token(a)
    if a.is_cuda:
        from meshserve.kernels.triton_fp8_block import per_token_group_quant_fp8

        return per_token_group_quant_fp8(a, block_k)
    # (CPU tensors: Triton's interpreter, whose fp32 -> fp8 cast mis-rounds; the kernel under test is the GEMM)
    from meshserve.kernels.fp8_block_ref import quantize_fp8_per_token_group

    return quantize_fp8_per_token_group(a, block_k)


def _with_shared_pairs(topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_routed: int, width: int,
                       shared_w13: torch.Tensor, shared_w2: torch.Tensor, quant: int):
    """(weights [T, K + S], ids [T, K + S], S): every token's pairs plus one of weight 1.0 for each of the S
    width-wide slices of a shared MLP (ids num_routed + s). The MLP's output is the sum over its intermediate
    units, so the sum over slices is exactly the MLP; DeepSeek's routed_scaling_factor is in the routed
    weights only, as in HF's DeepseekV2/V3MoE (shared_experts(x) added unscaled)."""
    if quant != NO_QUANT:
        raise ValueError("a shared MLP folds into 16-bit experts only (fp8 experts keep the separate MLP)")
    num_shared = shared_w2.shape[1] // width
    if shared_w2.shape[1] != num_shared * width or shared_w13.shape[0] != 2 * num_shared * width:
        raise ValueError(f"shared MLP of {shared_w2.shape[1]} features is no whole number of {width}-wide "
                         "experts")
    if shared_w13.stride(1) != 1 or shared_w2.stride(1) != 1:
        raise ValueError("the shared MLP's weights need contiguous rows")
    tokens = topk_ids.shape[0]
    shared_ids, ones = _shared_slots(num_routed, num_shared, topk_ids.device)
    ids = torch.cat([topk_ids.to(torch.int32), shared_ids.expand(tokens, num_shared)], dim=1)
    return torch.cat([topk_weights.float(), ones.expand(tokens, num_shared)], dim=1), ids, num_shared


@functools.cache
def _shared_slots(num_routed: int, num_shared: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared experts' ids [S] (int32) and weights [S] (ones, float32): made once (the warm-up's eager
    steps, before any CUDA graph capture), so a call adds only its two concatenations."""
    ids = torch.arange(num_routed, num_routed + num_shared, dtype=torch.int32, device=device)
    return ids, torch.ones(num_shared, dtype=torch.float32, device=device)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, block: tuple[int, int] | None = None,
                  configs: str | StageConfigs = "tuned", aligned: tuple | None = None,
                  shared_w13: torch.Tensor | None = None, shared_w2: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H]; w13 [E, 2*I, H]; w2 [E, H, I]; topk_weights [T, K]; topk_ids [T, K] (-1: skip) -> [T, H].
    fp8 weights: their scales, per channel or (block) per block, as kernels/moe_ref.py lays them out.
    configs: "tuned" | "legacy" (module docstring), or explicit StageConfigs (tools/bench_moe.py's sweep).
    aligned: align_by_expert's outputs for these ids at the configs' BLOCK_M, already made (the routing
    launch of triton_moe_route_align); used on the grouped, non-legacy path only.
    shared_w13 [2*S*I, H] / shared_w2 [H, S*I]: a 16-bit shared MLP added as S more experts (ids E..E+S-1) of
    weight one for every token, in the same launches (_with_shared_pairs)."""
    num_tokens, hidden = x.shape
    num_experts, width = w13.shape[0], w2.shape[2]
    num_routed = num_experts
    quant = NO_QUANT if w13_scale is None else PER_CHANNEL if block is None else BLOCKWISE
    if shared_w13 is not None:
        if w13.stride(2) != 1 or w2.stride(2) != 1 or {shared_w13.dtype, shared_w2.dtype} != {w13.dtype}:
            raise ValueError("a shared MLP folds into experts of its dtype with contiguous rows")
        topk_weights, topk_ids, num_shared = _with_shared_pairs(topk_weights, topk_ids, num_experts, width,
                                                                 shared_w13, shared_w2, quant)
        num_experts += num_shared
    top_k = topk_ids.shape[1]
    pairs = num_tokens * top_k
    if pairs == 0:
        return x.new_zeros(num_tokens, hidden)
    if quant == BLOCKWISE and block[1] != 128:
        raise ValueError(f"fp8 MoE kernel: K blocks of {block[1]} features (128 only)")
    scale_n = block[0] if quant == BLOCKWISE else 1
    weights = topk_weights.reshape(-1).float().contiguous()
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    inter = x.new_empty(pairs, width)
    out_pairs = x.new_empty(pairs, hidden)
    legacy = configs == "legacy"
    gemv = use_pair_gemv(num_tokens, pairs, num_experts)
    if not gemv:
        if isinstance(configs, str):
            configs = stage_configs(configs, pairs, num_experts, quant != NO_QUANT, quant == BLOCKWISE,
                                    x.element_size())
        if configs.gate_up.BLOCK_M != configs.down.BLOCK_M:
            raise ValueError("both stages' configs need one BLOCK_M (the rows are aligned once)")
        block_m = configs.gate_up.BLOCK_M
        if aligned is not None and not legacy:
            sorted_rows, block_expert, num_padded = aligned
            rows_padded = triton.cdiv(pairs + num_experts * (block_m - 1), block_m) * block_m
            if (sorted_rows.numel(), block_expert.numel()) != (rows_padded, rows_padded // block_m):
                raise ValueError(f"an alignment made for other pairs, experts or tiles than this call's {pairs} "
                                 f"pairs among {num_experts} experts at BLOCK_M {block_m}")
        else:
            align = align_by_expert if legacy else triton_moe_align.align_by_expert
            sorted_rows, block_expert, num_padded = align(ids, num_experts, block_m)
        if legacy:
            out_pairs.zero_()  # pairs of other ranks' experts (-1) are never written
    precision = "ieee" if x.dtype == torch.float32 and quant == NO_QUANT else None
    # the shared MLP's slices, per stage: (weights, slice stride, row stride, up rows' offset); placeholders
    # (never read: HAS_SHARED off) fixed so that they pick no new specialization
    if shared_w13 is None:
        shared_stages = ((w13, 0, 0, 0), (w2, 0, 0, 0))
    else:
        shared_stages = ((shared_w13, width * shared_w13.stride(0), shared_w13.stride(0),
                          num_shared * width * shared_w13.stride(0)),
                         (shared_w2, width, shared_w2.stride(0), 0))
    stages = ((x, w13, w13_scale, inter, width, hidden, top_k, True, shared_stages[0]),
              (inter, w2, w2_scale, out_pairs, hidden, width, 1, False, shared_stages[1]))
    for a, b, b_scale, c, n, k, rows_per_token, gated, shared_args in stages:
        cfg = None if gemv else (configs.gate_up if gated else configs.down).kwargs()
        # (the second stage's input is the first's output: quantized only once it is written)
        if quant == NO_QUANT:
            # never read (the kernels' QUANT branches are off): a placeholder pointer and fixed strides and
            # scale row, so no per-call value (the strides once were the pair count) picks a specialization
            # (== 1, divisible by 16) and compiles the kernel again inside serving (issue 29)
            a_scale = b_scale = weights
            up_row, scale_args = 0, (0, 0, 0, 0)
        else:
            b_scale = b_scale.float().contiguous()
            a, a_scale = _quantize_rows(a, quant, 128)
            up_row = triton.cdiv(n, scale_n) if gated else 0
            scale_args = (a_scale.stride(0), b_scale.stride(0), b_scale.stride(1),
                          b_scale.stride(2) if b_scale.dim() == 3 else 0)
        if gemv:
            # narrower column tiles when few programs would leave SMs idle (batch 1: 8 pairs x 12 tiles)
            block_n = 32 if pairs * triton.cdiv(n, 64) < 256 else 64
            grid = (pairs, triton.cdiv(n, block_n))
            _pair_gemv_kernel[grid](
                a, b, c, weights, ids, a_scale, b_scale, n, k, up_row,
                a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
                *scale_args, shared_args[0], num_routed, *shared_args[1:], QUANT=quant, BLOCK_SCALE_N=scale_n,
                HAS_SHARED=shared_w13 is not None,
                A_ROWS_PER_TOKEN=rows_per_token, GATED=gated, MUL_WEIGHT=not gated, BLOCK_N=block_n, BLOCK_K=128,
                num_warps=4)
        else:
            grid = (triton.cdiv(sorted_rows.numel(), cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
            _grouped_gemm_kernel[grid](
                a, b, c, weights, sorted_rows, block_expert, num_padded, a_scale, b_scale,
                n, k, pairs, sorted_rows.numel(), up_row,
                a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
                *scale_args, shared_args[0], num_routed, *shared_args[1:], QUANT=quant, BLOCK_SCALE_N=scale_n,
                HAS_SHARED=shared_w13 is not None,
                A_ROWS_PER_TOKEN=rows_per_token, GATED=gated, MUL_WEIGHT=not gated, PRECISION=precision, **cfg)
    if gemv or legacy:
        return out_pairs.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)
    out = x.new_empty(num_tokens, hidden)
    _combine_kernel[(num_tokens, triton.cdiv(hidden, 1024))](
        out_pairs, ids, out, hidden, out_pairs.stride(0), out.stride(0), TOP_K=top_k, BLOCK_H=1024, num_warps=4)
    return out
