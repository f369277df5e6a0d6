"""Residual add + RMSNorm + the next projection in ONE launch, for rows short enough to hold whole (batch 1).

triton_gemv.rms_norm_gemv takes two launches: a one-program kernel for h = x + residual and 1 / rms(h), then
the GEMV scaling h on load. Where K <= MAX_ROW_K every GEMV program holds its weight rows whole ([BLOCK_N, K]
in registers, loaded before the PDL wait: no kernel writes weights), so it can also hold the whole input row:
each program loads x and the residual, adds them, takes the sum of squares itself and normalizes, while its
weights are still on their way. No statistics kernel, no launch gap between the two. Program 0 stores the new
residual h and, when asked, the normed row (an MoE block's experts read it after the router's GEMV and the
routing: models/moe.py).

Every program computes the same statistics from the same row with the same code, so they agree; the sum of
squares is a one-row tl.sum like rms_norm's (rms_norm_row), whose order it shares only where Triton lays out
the row alike: the normed row may differ from rms_norm's by an ulp where the fp32 statistics round differently
(the GPU test measures it). norm_row_gemv_ref is rms_norm_ref then F.linear.

Why only short rows: a program that re-reads a long row (Llama-3.1-8B's 4,096) before its weight stream made
decode 9% slower (triton_gemv's docstring); here the row and the statistics ride under the weights' latency.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from meshserve.kernels import pdl as pdl_mod
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait

# rows of at most this many features (4 rows x 2,048 16-bit weights = 16 KB a program, triton_gemv.MAX_PRE_K's
# register budget): Qwen3-0.6B (1,024), Qwen3-30B-A3B and DeepSeek-V2-Lite (2,048)
MAX_ROW_K = 2048


def fits(k: int) -> bool:
    return k <= MAX_ROW_K


def row_tile(block_k: int) -> tuple[int, int]:
    """(rows a program, warps) for rows padded to block_k: 8 rows on 8 warps from 2,048, 4 on 4 below;
    MESHSERVE_NORM_ROW_TILE="block_n,num_warps" for A/Bs (read at each launch: graphs capture launches once).
    Every program normalizes the whole row, so more rows a program is less of that work: H200 W1 Qwen3-30B-A3B
    (its QKV and router rows, 2,048), 2026-12-04, two processes each: 4 x 8 warps (the first tile) 360.9 tok/s,
    8 x 8 365.0, 16 x 8 358.0 (one each the call before: 4 x 8 362.0, 2 x 4 365.4, 4 x 4 363.9, 8 x 8 366.1).
    The 1,024 rows (Qwen3-0.6B) keep 4 x 4: not measured."""
    spec = os.environ.get("MESHSERVE_NORM_ROW_TILE", "")
    if not spec:
        return (8, 8) if block_k >= 2048 else (4, 4)
    try:
        block_n, num_warps = (int(v) for v in spec.split(","))
        if block_n < 1 or num_warps not in (1, 2, 4, 8, 16):
            raise ValueError
    except ValueError:
        raise ValueError(f"MESHSERVE_NORM_ROW_TILE={spec!r}: expected block_n,num_warps") from None
    return block_n, num_warps


def norm_row_gemv_ref(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                      weight: torch.Tensor, bias: torch.Tensor | None = None):
    """(F.linear(rms_norm(x + residual)), x + residual, rms_norm(x + residual)); without a residual x itself."""
    from meshserve.kernels.triton_ops import rms_norm_ref

    if residual is None:
        normed, h = rms_norm_ref(x, norm_weight, eps), x
    else:
        normed, h = rms_norm_ref(x, norm_weight, eps, residual)
    return F.linear(normed, weight, bias), h, normed


@triton.jit
def _norm_row_gemv_kernel(x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, h_out_ptr, xn_out_ptr, N, K, stride_w,
                          eps, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_NORMED: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr = False):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    # the whole rows of weights first (before the wait under PDL): the row's statistics ride under their latency
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_w + ks[None, :],
                mask=rmask[:, None] & kmask[None, :], other=0.0)
    nw = tl.load(nw_ptr + ks, mask=kmask, other=0.0)
    gdc_wait(USE_GDC)  # x and the residual are earlier kernels' outputs
    dt = x_ptr.dtype.element_ty
    h = tl.load(x_ptr + ks, mask=kmask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + ks, mask=kmask, other=0.0)
    gdc_trigger_late(USE_GDC)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + r.to(tl.float32)).to(dt)  # rms_norm_row's add, in x's dtype
    hf = h.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / K + eps)
    xn = (nw.to(tl.float32) * (hf * inv_rms).to(dt).to(tl.float32)).to(dt)  # rms_norm's output, rounded
    if pid == 0:  # the row's h and normed values, once
        if HAS_RESIDUAL:
            tl.store(h_out_ptr + ks, h, mask=kmask)
        if STORE_NORMED:
            tl.store(xn_out_ptr + ks, xn, mask=kmask)
    y = tl.sum(w.to(tl.float32) * xn.to(tl.float32)[None, :], 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


def norm_row_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  weight: torch.Tensor, bias: torch.Tensor | None = None, *, normed_out: bool = False,
                  block_n: int | None = None, pdl: bool | None = None):
    """norm_row_gemv_ref for one row x [..., K] with K <= MAX_ROW_K (residual alike, or None), norm_weight [K],
    weight [N, K] all of x's dtype: returns (y [..., N], the new residual (x + residual, or x itself), the normed
    row or None unless normed_out). block_n: rows a program (None: row_tile's). pdl: as triton_gemv.gemv."""
    n, k = weight.shape
    if not fits(k):
        raise ValueError(f"norm_row_gemv holds rows of at most {MAX_ROW_K} features, got {k}")
    if x.numel() != k or norm_weight.numel() != k or (residual is not None and residual.numel() != k):
        raise ValueError(f"norm_row_gemv takes one row of {k} features, got shape {tuple(x.shape)}")
    others = (weight, norm_weight, residual, bias)
    if any(t is not None and t.dtype != x.dtype for t in others):
        raise ValueError("norm_row_gemv needs x, residual, norm weight, weight and bias of one dtype")
    x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    h = torch.empty_like(x) if residual is not None else x
    normed = torch.empty_like(x) if normed_out else None
    block_k = triton.next_power_of_2(k)
    tile_n, num_warps = row_tile(block_k)
    block_n = block_n or tile_n
    programs = triton.cdiv(n, block_n)
    _norm_row_gemv_kernel[(programs,)](
        x, residual.contiguous() if residual is not None else x, norm_weight, weight,
        bias if bias is not None else weight, y, h, normed if normed_out else x, n, k, weight.stride(0),
        float(eps), HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, STORE_NORMED=normed_out,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        **pdl_mod.gdc_kwargs(x, pdl, programs=programs, num_warps=num_warps))
    return y, h, normed
