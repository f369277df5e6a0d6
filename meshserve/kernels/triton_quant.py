"""Triton INT4 dequant-GEMM; kernels/quant_ref.py holds its plain torch reference. The batch-1 GEMVs of quantized
weights are triton_fp8_gemv.py and triton_int4_gemv.py.

int4_matmul: y[M, N] = x[M, K] @ W[K, N] (+ bias) with W in the internal INT4 layout (qweight [K/8, N] int32,
scales/zeros [G, N], optional g_idx [K]). Each program owns a BLOCK_M x BLOCK_N tile and walks K: it loads the
packed int32 row of every k (8 k share one int32, served from cache), shifts out the nibble, dequantizes in
fp32 with the scale and zero of k's group, rounds once to the activation dtype and feeds tl.dot (M is padded to
16 rows inside the tile): prefill and batches above triton_int4_gemv.MAX_GEMV_ROWS. Reference:
quant_ref.int4_linear_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M"])  # per-step counts (triton_unified_attention)
def _int4_matmul_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    g_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_qk,
    stride_sg,
    stride_ym,
    HAS_G_IDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rk = tl.arange(0, BLOCK_K)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        kmask = kk < K
        a = tl.load(
            x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :],
            mask=mmask[:, None] & kmask[None, :],
            other=0.0,
        )
        wmask = kmask[:, None] & nmask[None, :]
        packed = tl.load(
            qw_ptr + (kk // 8)[:, None].to(tl.int64) * stride_qk + rn[None, :], mask=wmask, other=0
        )
        q = (packed >> ((kk % 8) * 4)[:, None]) & 0xF
        if HAS_G_IDX:
            g = tl.load(g_ptr + kk, mask=kmask, other=0)
        else:
            g = kk // group_size
        sz_off = g[:, None].to(tl.int64) * stride_sg + rn[None, :]
        s = tl.load(s_ptr + sz_off, mask=wmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz_off, mask=wmask, other=0.0).to(tl.float32)
        w = ((q.to(tl.float32) - z) * s).to(dt)
        acc += tl.dot(a, w, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=mmask[:, None] & nmask[None, :],
    )


def _int4_tiles(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): decode rows get narrow N tiles (more programs for the bandwidth),
    prefill rows square-ish tiles."""
    if m <= 16:
        return 16, 32, 128, 4
    if m <= 64:
        return 64, 64, 64, 4
    return 128, 128, 32, 8


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same as quant_ref.int4_linear_ref: x [..., K] -> [..., N] in x.dtype."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[1] != k:
        raise ValueError(f"int4_matmul: x has {x2.shape[1]} features, the weight {k}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        bm, bn, bk, warps = _int4_tiles(m)
        scales, zeros, qweight = scales.contiguous(), zeros.contiguous(), qweight.contiguous()
        _int4_matmul_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            x2,
            qweight,
            scales,
            zeros,
            g_idx if g_idx is not None else qweight,
            bias if bias is not None else y,
            y,
            m,
            n,
            k,
            group_size,
            x2.stride(0),
            qweight.stride(0),
            scales.stride(0),
            y.stride(0),
            HAS_G_IDX=g_idx is not None,
            HAS_BIAS=bias is not None,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            num_warps=warps,
            num_stages=3,
        )
    return y.reshape(*shape[:-1], n)
