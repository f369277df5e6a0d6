"""Triton kernels for block-wise FP8 weights; kernels/fp8_block_ref.py holds their torch references.

per_token_group_quant_fp8: x [M, K] -> fp8 [M, K] and fp32 scales [M, ceil(K / G)], one program per (row,
group): the group's absmax maps to 448. Reference: fp8_block_ref.quantize_fp8_per_token_group.

fp8_block_gemm: y[M, N] = x_q[M, K] . w_q[N, K]^T with per-(row, K-block) activation scales and per-(128 x 128)
weight block scales. Each program owns a BLOCK_M x BLOCK_N tile and walks K one scale block at a time
(BLOCK_K = the block's K size): an fp8 x fp8 tl.dot (fp32 accumulate, tensor cores on Hopper) whose partial
sum is scaled by that K block's activation scale (per row) and weight scale (per BN outputs) before it joins
the fp32 accumulator, so no operand is ever dequantized. Reference: fp8_block_ref.fp8_block_linear_ref.

fp8_block_matmul chains the two: the activation quantization is its own small pass (the GEMM would otherwise
redo it for every N tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.quant_ref import _MIN_SCALE, FP8_DTYPE, FP8_MAX


@triton.jit
def _per_token_group_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    min_scale,
    fp8_max,
    GROUP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0) / fp8_max, min_scale)
    q = tl.clamp(x / scale, -fp8_max, fp8_max)
    tl.store(q_ptr + row * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + group, scale)


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], fp32 scales [M, ceil(K / group_size)]); group_size a power of two."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    groups = triton.cdiv(k, group_size)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    if m:
        _per_token_group_quant_kernel[(m, groups)](
            x, q, s, k, x.stride(0), q.stride(0), s.stride(0), _MIN_SCALE, FP8_MAX, GROUP=group_size
        )
    return q, s


@triton.jit(do_not_specialize=["M"])  # per-step counts (triton_unified_attention)
def _fp8_block_gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_asm,
    stride_bn,
    stride_bsn,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    BLOCK_SCALE_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    a_rows = a_ptr + rm[:, None].to(tl.int64) * stride_am
    b_cols = b_ptr + rn[None, :].to(tl.int64) * stride_bn  # w [N, K] read as its transpose [K, N]
    a_scales = as_ptr + rm.to(tl.int64) * stride_asm
    b_scales = bs_ptr + (rn // BLOCK_SCALE_N).to(tl.int64) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(tl.cdiv(K, BLOCK_K)):
        kk = kb * BLOCK_K + rk
        kmask = kk < K
        a = tl.load(a_rows + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_cols + kk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        sa = tl.load(a_scales + kb, mask=mmask, other=0.0)
        sb = tl.load(b_scales + kb, mask=nmask, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :],
        acc.to(c_ptr.dtype.element_ty),
        mask=mmask[:, None] & nmask[None, :],
    )


def _gemm_tiles(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): decode rows get narrow N tiles (more programs stream the weight), prefill
    rows 128 x 128 tiles (the weight block: one weight scale per tile)."""
    if m <= 16:
        return 16, 64, 4
    if m <= 64:
        return 64, 64, 4
    return 128, 128, 8


def fp8_block_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """xq [M, K] fp8 with x_scale [M, ceil(K / BK)], weight [N, K] fp8 with scale_inv [ceil(N / BN),
    ceil(K / BK)] -> [M, N] in out_dtype."""
    m, k = xq.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if not m:
        return y
    bm, bn, warps = _gemm_tiles(m)
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    scale_inv = scale_inv.float().contiguous()
    _fp8_block_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        xq,
        x_scale,
        weight,
        scale_inv,
        bias if bias is not None else y,
        y,
        m,
        n,
        k,
        xq.stride(0),
        x_scale.stride(0),
        weight.stride(0),
        scale_inv.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_SCALE_N=block[0],
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=block[1],
        num_warps=warps,
        num_stages=3,
    )
    return y


def fp8_block_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same as fp8_block_ref.fp8_block_linear_ref: x [..., K] -> [..., N] in x.dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[1] != weight.shape[1]:
        raise ValueError(f"fp8_block_matmul: x has {x2.shape[1]} features, the weight {weight.shape[1]}")
    xq, xs = per_token_group_quant_fp8(x2, block[1])
    y = fp8_block_gemm(xq, xs, weight, scale_inv, block, bias, x.dtype)
    return y.reshape(*shape[:-1], weight.shape[0])
