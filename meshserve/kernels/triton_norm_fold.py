"""The batch-1 GEMV with the residual RMSNorm folded into its neighbours: no norm kernel between layers.

triton_gemv's GEMV gives each program BLOCK_N whole rows over all of K (no split-K), so a program owns
complete outputs. fold_gemv adds two optional ends to it (semantics, the fixed-point sum and its range:
kernels/norm_fold_ref.py):
  producer (residual, sum_out)     the epilogue stores h = y + residual for its rows (the new residual, which
                                   is also the next norm's input) and atomically adds its rows' sum of squares
                                   of h, in int64 fixed point, to sum_out (one pair per norm site)
  consumer (norm_weight, sum_in)   each program reads the pair, takes inv_rms = 1 / sqrt(sum / K + eps)
                                   and loads the row as rms_norm's output (triton_gemv._normed_x)
So o_proj -> gate_up and down_proj -> the next QKV need no norm kernel, and no program re-reads the row for
its statistics (the form that did lost 9% on the H200: triton_gemv's docstring). sum_out must be zero before
the producer runs (layers/norm_fold.py zeroes one buffer per step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels import pdl as pdl_mod
from meshserve.kernels.norm_fold_ref import FRAC_SCALE, SUM_SCALE, part_limit
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait
from meshserve.kernels.triton_gemv import MAX_PRE_K, _row_x, _stream_rows, _tile, gemv_prefetch


@triton.jit
def _fold_gemv_kernel(
    x_ptr,
    nw_ptr,
    sum_in_ptr,
    w_ptr,
    b_ptr,
    res_ptr,
    y_ptr,
    sum_out_ptr,
    N,
    K,
    stride_w,
    eps,
    part_cap,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    NORMED: tl.constexpr,
    RESIDUAL_OUT: tl.constexpr,
    SUM_SCALE: tl.constexpr,
    FRAC_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRE_K: tl.constexpr,
    PREFETCH: tl.constexpr = False,
    USE_GDC: tl.constexpr = False,
):
    """triton_gemv._gemv_kernel, with NORMED taking 1 / rms from the int64 pair at sum_in_ptr and RESIDUAL_OUT
    the producer's epilogue (y + residual stored, its fixed-point sum of squares added to the pair at
    sum_out_ptr)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    y = tl.zeros([BLOCK_N], dtype=tl.float32)
    if PRE_K > 0:  # PDL: weights only before the wait (triton_gemv)
        kp = tl.arange(0, PRE_K)
        pmask = kp < K
        w_pre = tl.load(w_rows + kp[None, :], mask=rmask[:, None] & pmask[None, :], other=0.0)
    gdc_wait(USE_GDC)  # the row, its sum of squares and the residual come from earlier kernels
    if NORMED:
        # the int64 pair (whole, fraction) in fp32: norm_fold_ref.sum_of_squares
        whole = tl.load(sum_in_ptr).to(tl.float32) * (1.0 / SUM_SCALE)
        total = whole + tl.load(sum_in_ptr + 1).to(tl.float32) * (1.0 / (SUM_SCALE * FRAC_SCALE))
        inv_rms = 1.0 / tl.sqrt(total / K + eps)
    else:
        inv_rms = 1.0
    if PRE_K > 0:
        y += tl.sum(
            w_pre.to(tl.float32) * _row_x(x_ptr, nw_ptr, inv_rms, kp, pmask, K, GATED, NORMED)[None, :], 1
        )
    acc = _stream_rows(x_ptr, nw_ptr, inv_rms, w_rows, rmask, K, GATED, NORMED, BLOCK_N, BLOCK_K, PRE_K, PREFETCH)
    if RESIDUAL_OUT:
        r = tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    gdc_trigger_late(USE_GDC)
    y += tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    dt = y_ptr.dtype.element_ty
    if RESIDUAL_OUT:
        # the projection's output rounded as o_proj's is, then the add rounded as rms_norm's residual add
        h = (y.to(dt).to(tl.float32) + r).to(dt)
        tl.store(y_ptr + rows, h, mask=rmask)
        hf = tl.where(rmask, h.to(tl.float32), 0.0)
        part = tl.minimum(tl.sum(hf * hf, 0) * SUM_SCALE, part_cap)
        whole = tl.floor(part)
        tl.atomic_add(sum_out_ptr, whole.to(tl.int64))
        tl.atomic_add(sum_out_ptr + 1, ((part - whole) * FRAC_SCALE + 0.5).to(tl.int64))
    else:
        tl.store(y_ptr + rows, y.to(dt), mask=rmask)


def _check_pair(t: torch.Tensor | None, name: str, device: torch.device) -> None:
    if t is None or t.dtype != torch.int64 or t.shape != (2,) or t.stride(0) != 1 or t.device != device:
        raise ValueError(f"fold_gemv: {name} must be a pair of int64s on the row's device")


def fold_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gated: bool = False,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    sum_in: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    sum_out: torch.Tensor | None = None,
    block_n: int = 4,
    pdl: bool | None = None,
) -> torch.Tensor:
    """norm_fold_ref.fold_gemv_ref for one row x [..., K] (gated: [..., 2K]) and weight [N, K] of x's dtype:
    a consumer with norm_weight + sum_in, a producer with residual + sum_out (then N == K and the result is
    the new residual h), either, both or neither. pdl: as triton_gemv.gemv."""
    n, k = weight.shape
    if x.numel() != (2 * k if gated else k):
        raise ValueError(f"fold_gemv takes one row of {2 * k if gated else k} features, got {tuple(x.shape)}")
    normed, produces = norm_weight is not None, residual is not None
    if normed and gated:
        raise ValueError("fold_gemv: a gated row is not a norm's input")
    if normed:
        _check_pair(sum_in, "sum_in", x.device)
    if produces:
        _check_pair(sum_out, "sum_out", x.device)
        if residual.numel() != n:
            raise ValueError(
                f"fold_gemv: the residual must hold the {n} outputs, got {tuple(residual.shape)}"
            )
    others = (weight, norm_weight, residual, bias)
    if any(t is not None and t.dtype != x.dtype for t in others):
        raise ValueError("fold_gemv needs x, weight, norm weight, residual and bias of one dtype")
    x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    block_k, num_warps, _ = _tile(k)  # (the fold's rows a program stay its own: part_limit splits by them)
    programs = triton.cdiv(n, block_n)
    gdc = pdl_mod.gdc_kwargs(x, pdl, programs=programs, num_warps=num_warps)
    pre_k = pdl_mod.preload_columns(x, k, pdl, gdc, MAX_PRE_K) if block_n == 4 else 0
    _fold_gemv_kernel[(programs,)](
        x,
        norm_weight if normed else weight,
        sum_in if normed else weight,
        weight,
        bias if bias is not None else weight,
        residual.contiguous() if produces else weight,
        y,
        sum_out if produces else weight,
        n,
        k,
        weight.stride(0),
        float(eps),
        part_limit(n, block_n),
        HAS_BIAS=bias is not None,
        GATED=gated,
        NORMED=normed,
        RESIDUAL_OUT=produces,
        SUM_SCALE=SUM_SCALE,
        FRAC_SCALE=FRAC_SCALE,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRE_K=pre_k,
        PREFETCH=gemv_prefetch("dense"),
        num_warps=num_warps,
        num_stages=3,
        **gdc,
    )
    return y
