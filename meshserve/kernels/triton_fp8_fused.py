"""The fp8 projections' activation quantization fused into the kernel that produces the activation.

* rms_norm_quant_fp8(x, weight, eps, residual=None) -> ((fp8 [M, H], fp32 scale [M, 1]), x + residual or None):
  RMSNorm (+ residual add) of triton_ops.rms_norm, its output rounded to x's dtype as there, then quantized per
  token as triton_fp8_quant.quantize_fp8_per_token: the input of an fp8 qkv_proj or gate_up_proj.
* silu_and_mul_quant_fp8(gate_up) -> (fp8 [M, d], fp32 scale [M, 1]): triton_ops.silu_and_mul then the same
  per-token quantization: the input of an fp8 down_proj.
The *_ref functions beside them are the compositions of the torch references (the oracle); on a GPU the fused
kernels equal the unfused Triton pair bit for bit.

Why: with fp8 weights each projection's input was written in 16 bits by its producer and read back by the
quantization kernel (one more launch each). One program per row holds the whole row in registers (up to
MAX_COLS columns; wider rows decline and the unfused pair serves), so the 16-bit activation never goes to
memory and 3 of the 4 quantization launches per layer go (o_proj's input comes from attention: quantized by
the separate pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.pdl import gdc_kwargs
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait
from meshserve.kernels.quant_ref import _MIN_SCALE, FP8_DTYPE, FP8_MAX, quantize_fp8_per_token
from meshserve.kernels.triton_ops import rms_norm_ref, rms_norm_row, silu_and_mul_ref, silu_mul

MAX_COLS = 16384  # a row in registers (Llama-3.1-8B: hidden 4096, MLP 14336)


def fits(cols: int) -> bool:
    """Whether rows of `cols` features take the fused kernels (else the unfused pair)."""
    return cols <= MAX_COLS


def rms_norm_quant_fp8_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if residual is None:
        return quantize_fp8_per_token(rms_norm_ref(x, weight, eps)), None
    normed, res = rms_norm_ref(x, weight, eps, residual)
    return quantize_fp8_per_token(normed), res


def silu_and_mul_quant_fp8_ref(x: torch.Tensor):
    return quantize_fp8_per_token(silu_and_mul_ref(x))


@triton.jit
def _quantize_row(y, cols, mask, q_row, s_ptr, row, min_scale, FP8_MAX: tl.constexpr):
    """y [BLOCK] fp32 (already rounded to the activation dtype) -> its fp8 row and scale, as
    triton_fp8_quant (IEEE divisions, saturation, round to nearest even)."""
    y = tl.where(mask, y, 0.0)
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(y), 0), FP8_MAX), min_scale)
    q = tl.clamp(tl.math.div_rn(y, scale), -FP8_MAX, FP8_MAX)
    tl.store(q_row + cols, q.to(q_row.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _rms_norm_quant_kernel(x_ptr, res_ptr, w_ptr, q_ptr, s_ptr, res_out_ptr, n_cols, eps, min_scale,
                           stride_x, stride_r, stride_q, stride_ro,
                           FP8_MAX: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                           USE_GDC: tl.constexpr = 0):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    y = rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, cols, mask, n_cols, eps, stride_x, stride_r,
                     stride_ro, HAS_RESIDUAL, USE_GDC)
    y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # rms_norm's output rounding
    _quantize_row(y, cols, mask, q_ptr + row * stride_q, s_ptr, row, min_scale, FP8_MAX)


@triton.jit
def _silu_and_mul_quant_kernel(x_ptr, q_ptr, s_ptr, d, min_scale, stride_x, stride_q,
                               FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr = 0):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < d
    gdc_wait(USE_GDC)
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    gdc_trigger_late(USE_GDC)
    dt = x_ptr.dtype.element_ty
    y = silu_mul(gate, up, dt).to(tl.float32)
    _quantize_row(y, cols, mask, q_ptr + row * stride_q, s_ptr, row, min_scale, FP8_MAX)


def _warps(block: int) -> int:
    return max(4, min(16, block // 1024))


def rms_norm_quant_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Same as rms_norm_quant_fp8_ref for x [M, H] (H <= MAX_COLS, weight in x's dtype)."""
    m, hidden = x.shape
    if not fits(hidden) or weight.dtype != x.dtype:
        raise ValueError(f"rms_norm_quant_fp8: {hidden} features (max {MAX_COLS}), weight {weight.dtype}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = torch.empty((m, hidden), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if residual is not None:
        r = residual if residual.stride(-1) == 1 else residual.contiguous()
        res_out = torch.empty_like(x)
    else:
        r = res_out = x
    if m:
        block = triton.next_power_of_2(hidden)
        _rms_norm_quant_kernel[(m,)](
            x, r, weight, q, s, res_out, hidden, float(eps), _MIN_SCALE,
            x.stride(0), r.stride(0), q.stride(0), res_out.stride(0),
            FP8_MAX=FP8_MAX, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_warps(block),
            **gdc_kwargs(x, programs=m, num_warps=_warps(block)),
        )
    return (q, s), (res_out if residual is not None else None)


def silu_and_mul_quant_fp8(x: torch.Tensor):
    """Same as silu_and_mul_quant_fp8_ref for x [M, 2d] (d <= MAX_COLS)."""
    m, d = x.shape[0], x.shape[1] // 2
    if not fits(d):
        raise ValueError(f"silu_and_mul_quant_fp8: {d} features (max {MAX_COLS})")
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = torch.empty((m, d), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m and d:
        block = triton.next_power_of_2(d)
        _silu_and_mul_quant_kernel[(m,)](
            x, q, s, d, _MIN_SCALE, x.stride(0), q.stride(0),
            FP8_MAX=FP8_MAX, BLOCK=block, num_warps=_warps(block),
            **gdc_kwargs(x, programs=m, num_warps=_warps(block)),
        )
    return q, s
