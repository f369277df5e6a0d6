"""FP8 (e4m3) activation quantization in one Triton pass: the input of torch._scaled_mm in fp8_linear.

quantize_fp8_per_token(x [M, K]) -> (fp8 [M, K], fp32 scale [M, 1]): each row's absmax maps to 448.
quantize_fp8_static(x [M, K], scale [] or [1]) -> fp8 [M, K]: x / scale with the checkpoint's static scale.
References (and the CPU path): quant_ref.quantize_fp8_per_token and quant_ref.to_fp8, bit for bit as CPU torch
computes them: the same IEEE divisions (div_rn, not Triton's approximate `/`), the same saturation at +-448,
round-to-nearest-even. (CUDA torch divides by a Python scalar through its reciprocal, so the reference run on a
GPU may differ by one ulp in a scale; given the scales, the fp8 rows are equal.)

Why: the reference in eager torch is nine kernels over fp32 copies of x (cast, abs, amax, div, clamp, cast,
div, clamp, cast); before each of the four fp8 projections of every layer that is ~1,150 launches and ~60
fp32 passes over the activations per decode step of Llama-3.1-8B at batch 256. Here one program owns one
row: it reads the row once (in registers up to MAX_BLOCK columns, else a second pass that hits L2), writes
the fp8 row and its scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.pdl import gdc_kwargs
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait
from meshserve.kernels.quant_ref import _MIN_SCALE, FP8_DTYPE, FP8_MAX

MAX_BLOCK = 16384  # columns held in registers at once (Llama-3.1-8B's down_proj input, 14336, fits)


@triton.jit
def _quantize_fp8_rows_kernel(
    x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, min_scale,
    FP8_MAX: tl.constexpr, STATIC: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
    USE_GDC: tl.constexpr = 0,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    gdc_wait(USE_GDC)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    if STATIC:
        scale = tl.load(s_ptr).to(tl.float32)
    elif ONE_PASS:
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), 0), FP8_MAX), min_scale)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, K, BLOCK):
            xc = tl.load(x_row + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(xc))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, 0), FP8_MAX), min_scale)
    if ONE_PASS:
        if STATIC:
            x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        gdc_trigger_late(USE_GDC)
        q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)
    else:
        for start in range(0, K, BLOCK):
            xc = tl.load(x_row + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
            q = tl.clamp(tl.math.div_rn(xc, scale), -FP8_MAX, FP8_MAX)
            tl.store(q_row + start + cols, q.to(q_ptr.dtype.element_ty), mask=start + cols < K)
        gdc_trigger_late(USE_GDC)
    if not STATIC:
        tl.store(s_ptr + row, scale)


def _launch(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, static: bool) -> None:
    m, k = x.shape
    if m == 0 or k == 0:
        return
    block = min(MAX_BLOCK, triton.next_power_of_2(k))
    warps = max(4, min(16, block // 1024))
    _quantize_fp8_rows_kernel[(m,)](
        x, q, s, k, x.stride(0), q.stride(0), _MIN_SCALE,
        FP8_MAX=FP8_MAX, STATIC=static, BLOCK=block, ONE_PASS=k <= block,
        num_warps=warps, **gdc_kwargs(x, programs=m, num_warps=warps),
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected x [M, K], got {tuple(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as quant_ref.quantize_fp8_per_token: x [M, K] -> (fp8 [M, K], fp32 scale [M, 1])."""
    x = _rows(x)
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    _launch(x, q, s, static=False)
    return q, s


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Same as quant_ref.to_fp8(x, scale) for a one-element scale tensor: x [M, K] -> fp8 [M, K]."""
    x = _rows(x)
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    _launch(x, q, scale.reshape(1), static=True)
    return q
