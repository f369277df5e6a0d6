"""Quantized projections: the fast GPU path where it applies, else the plain reference (kernels/quant_ref.py).

FP8 weights
  one 16-bit row on a GPU (batch-1 decode)  Triton FP8-weight GEMV (weight-only: the row stays 16-bit;
                                            kernels/triton_fp8_gemv.py, variant cvt | half, or
                                            scaled_mm: the cuBLASLt path below for that row too)
  16-bit rows on a GPU, aligned shapes      one Triton pass quantizes the activation (kernels/triton_fp8_quant.py:
                                            per-token absmax, or the static scale), then torch._scaled_mm
                                            (cuBLASLt FP8 on Hopper) with per-token and per-channel scales, or
                                            (gemm "triton") the Triton rowwise GEMM (kernels/triton_decode_gemm.py),
                                            or (gemm "auto") that GEMM up to FP8_TRITON_MAX_ROWS rows, cuBLASLt above
  otherwise (CPU, fp32 models)              fp8_linear_ref: the same quantization, upcast matmul
Block-wise FP8 weights (128 x 128 scales, activations per 1 x 128 group)
  on a GPU                                  Triton block-scaled FP8 GEMM (kernels/triton_fp8_block.py), every
                                            batch size (the analog of torch._scaled_mm above)
  otherwise                                 fp8_block_linear_ref (kernels/fp8_block_ref.py)
INT4 weights
  <= 4 rows on a GPU (decode)               Triton INT4 GEMV (kernels/triton_int4_gemv.py, half; matmul:
                                            the dequant-GEMM below for these rows too)
  more rows on a GPU                        Triton dequant-GEMM (kernels/triton_quant.py)
  otherwise                                 dequantize, then F.linear
  act-order weights sorted by group at load (a perm): the GEMV gathers x through it, the others permute x first
`fast` / `gemv` is the backend selection's switch (the GEMV switch; off under MESHSERVE_DISABLE_FUSED_OPS): it
also picks the Triton activation quantization over the torch reference; the GEMV variants are its
MESHSERVE_FP8_GEMV / MESHSERVE_INT4_GEMV (layers/backend_selection.py).
"""

from __future__ import annotations

import functools

import torch

from meshserve.kernels.fp8_block_ref import fp8_block_linear_ref
from meshserve.kernels.fused import triton_module
from meshserve.kernels.quant_ref import (
    FP8_DTYPE,
    fp8_linear_ref,
    int4_linear_ref,
    quantize_activation,
)

# module globals, so a tool can swap one out (tools/bench_fp8_step.py turns the Triton quantization off)
_triton_quant = functools.partial(triton_module, "triton_quant")
_triton_decode_gemm = functools.partial(triton_module, "triton_decode_gemm")
_triton_fp8_gemv = functools.partial(triton_module, "triton_fp8_gemv")
_triton_int4_gemv = functools.partial(triton_module, "triton_int4_gemv")
_triton_fp8_quant = functools.partial(triton_module, "triton_fp8_quant")
_triton_fp8_block = functools.partial(triton_module, "triton_fp8_block")


@functools.cache
def _has_scaled_mm_rowwise(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def _scaled_mm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return (
        x.dtype == torch.bfloat16
        and k % 16 == 0
        and n % 16 == 0
        and _has_scaled_mm_rowwise(x.device.index or 0)
    )


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    gemv: bool = False,
    gemv_variant: str = "half",
    gemm: str = "scaled_mm",
) -> torch.Tensor:
    """x [..., K] @ fp8 weight [N, K]^T with per-channel weight_scale [N] (see the module docstring)."""
    if x.is_cuda:
        triton_fp8_gemv = _triton_fp8_gemv()
        if (
            gemv
            and gemv_variant != "scaled_mm"
            and triton_fp8_gemv is not None
            and x.numel() == x.shape[-1]
            and x.dtype in (torch.bfloat16, torch.float16)
        ):
            return triton_fp8_gemv.fp8_gemv(x, weight, weight_scale, bias, variant=gemv_variant)
        if _scaled_mm_fits(x, weight):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            xq, xs = _quantize_activation(x2, input_scale, fast=gemv)
            y = fp8_rows_linear(xq, xs.contiguous(), weight, weight_scale, bias, x.dtype, gemm)
            return y.reshape(*shape[:-1], weight.shape[0])
    return fp8_linear_ref(x, weight, weight_scale, input_scale, bias)


def _quantize_activation(x2: torch.Tensor, input_scale: torch.Tensor | None, fast: bool):
    """(fp8 x2, fp32 rowwise scales [M, 1]) for _scaled_mm: one Triton pass when `fast` (the selection's
    switch) and Triton imports (the torch reference is ~9 kernels over fp32 copies of x2), else the reference."""
    fq = _triton_fp8_quant() if fast else None
    if fq is None:
        xq, xs = quantize_activation(x2, input_scale)
    elif input_scale is None:
        return fq.quantize_fp8_per_token(x2)
    else:
        xq, xs = fq.quantize_fp8_static(x2, input_scale.float()), input_scale.float().reshape(1, 1)
    # a static per-tensor scale broadcast as rowwise, so one _scaled_mm config serves both (per token: a no-op)
    return xq, xs.expand(x2.shape[0], 1)


def fp8_rows_fit(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x [M, K] (M > 1: one row keeps the weight-only GEMV) may come pre-quantized per token to
    fp8_rows_linear: _scaled_mm serves it here."""
    return x.is_cuda and x.dim() == 2 and x.shape[0] > 1 and _scaled_mm_fits(x, weight)


# gemm "auto": the Triton rowwise GEMM up to this many rows. Measured alone on an H200 (BENCHMARKS.md, thirty-ninth
# session): 1.4-1.9x faster than _scaled_mm at 16 rows on each of Llama-3.1-8B's projections, mixed at 128, behind at
# 256; a step below 16 rows reads the same weights (memory-bound), so the kernel's lead holds there: the 8B's fp8
# decode at 2-16 rows +31-38% end to end (H200, fifty-third session), equal at 32 rows (_scaled_mm either way)
FP8_TRITON_MAX_ROWS = 16


def fp8_gemm_takes_triton(gemm: str, rows: int, on_gpu: bool) -> bool:
    """Whether fp8_rows_linear's gemm setting sends these rows to the Triton rowwise GEMM."""
    return gemm == "triton" or (gemm == "auto" and on_gpu and rows <= FP8_TRITON_MAX_ROWS)


def fp8_rows_linear(
    xq: torch.Tensor,
    xs: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    gemm: str = "scaled_mm",
) -> torch.Tensor:
    """Rows already quantized per token (fp8 xq [M, K], fp32 xs [M, 1]: kernels/triton_fp8_fused.py) @ the fp8
    weight [N, K]^T with per-channel weight_scale [N]: fp8_linear after its quantization step. gemm: "scaled_mm"
    (torch._scaled_mm, bias added after), "triton" (kernels/triton_decode_gemm.py, bias in its epilogue) or "auto"
    (triton up to FP8_TRITON_MAX_ROWS rows on a GPU, scaled_mm above)."""
    if fp8_gemm_takes_triton(gemm, xq.shape[0], xq.is_cuda):
        triton_decode_gemm = _triton_decode_gemm()
        if triton_decode_gemm is not None:
            return triton_decode_gemm.fp8_rowwise_gemm(xq, xs, weight, weight_scale, bias, out_dtype)
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.float()[None, :], out_dtype=out_dtype)
    return y if bias is None else y + bias


def fp8_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [..., K] @ block-wise fp8 weight [N, K]^T with scale_inv [ceil(N / BN), ceil(K / BK)] -> [..., N]."""
    if x.is_cuda:
        triton_fp8_block = _triton_fp8_block()
        if triton_fp8_block is not None:
            return triton_fp8_block.fp8_block_matmul(x, weight, scale_inv, block, bias)
    return fp8_block_linear_ref(x, weight, scale_inv, block, bias)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    fast: bool = False,
    gemv_variant: str = "half",
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ the INT4 weight in the internal layout (kernels/quant_ref.py) -> [..., N]. perm: act-order
    weights sorted by group at load (quant_ref.int4_group_order): x's features permuted by it, in the GEMV's
    loads, else by one index_select."""
    if fast and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32):
        triton_int4_gemv = _triton_int4_gemv()
        rows = x.numel() // x.shape[-1]
        if (
            gemv_variant != "matmul"
            and triton_int4_gemv is not None
            and rows <= triton_int4_gemv.MAX_GEMV_ROWS
        ):
            return triton_int4_gemv.int4_gemv(x, qweight, scales, zeros, group_size, g_idx, bias, perm=perm)
        triton_quant = _triton_quant()
        if triton_quant is not None:
            xp = x if perm is None else x.index_select(-1, perm)
            return triton_quant.int4_matmul(xp, qweight, scales, zeros, group_size, g_idx, bias)
    return int4_linear_ref(x, qweight, scales, zeros, group_size, g_idx, bias, perm=perm)


__all__ = ["FP8_DTYPE", "fp8_block_linear", "fp8_linear", "fp8_rows_fit", "fp8_rows_linear", "int4_linear"]
