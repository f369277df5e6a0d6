"""RMSNorm (+ residual add) folded into the next projection: one Triton GEMV at batch-1 decode.

A decoder layer runs `rms_norm(x, residual)` and then the QKV (or gate/up) projection; at batch 1 both are
GEMV-sized and the norm is one more launch and gap per pair (~2 x 32 per step of Llama-3.1-8B). With the
selection's norm_gemv switch, norm_linear does both in triton_gemv.rms_norm_gemv, with the norm's roundings: a
one-program kernel for h = x + residual and 1 / rms(h), then the GEMV scaling h on load (no normed row).
With fp8 weights (dynamic per-token activation scales) and more than one row on a GPU, norm_linear runs the
norm as triton_fp8_fused.rms_norm_quant_fp8 instead: the normed rows come out quantized, with their scales,
straight into _scaled_mm (no 16-bit normed rows in memory, no separate quantization kernel).
With the norm_row_gemv switch and rows of <= 2,048 features both run in ONE launch instead
(kernels/triton_norm_row_gemv.py: each GEMV program normalizes the whole row itself), whether or not norm_gemv
is on.
Where no path applies it returns None and the caller keeps the two-module path beside it.
"""

from __future__ import annotations

import torch

from meshserve.kernels.fused import fp8_fused_for, gemv_for, norm_row_gemv_for
from meshserve.layers.linear import LinearBase
from meshserve.layers.norm import RMSNorm


def norm_linear(
    norm: RMSNorm, linear: LinearBase, x: torch.Tensor, residual: torch.Tensor | None, act_out: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(linear(norm(x + residual)), x + residual) — without a residual (linear(norm(x)), x) — in the fold, or
    None where that path does not apply: the switch is off, x is not one 16-bit row on a GPU (gemv_for), the
    weight is quantized, or the projection's input is split across ranks (row-parallel: its input is not the
    whole normed row). Column-parallel QKV / gate_up take the replicated row, so TP keeps the fused path.
    fp8 weights: the norm + per-token fp8 quantization kernel, then the projection on the fp8 rows.
    act_out (a 16-bit [gate | up] linear): silu(gate) * up in place of the projection, from the GEMV's epilogue
    (triton_gemv.rms_norm_gemv); None where the two-kernel norm_gemv path is not the one taken (the one-launch
    norm_row_gemv has no such epilogue: its gate_up keeps the down GEMV's gated input)."""
    if linear.quantized:
        return None if act_out else _norm_fp8_linear(norm, linear, x, residual)
    kernels = linear.kernels
    if not (kernels.norm_gemv or kernels.norm_row_gemv) or linear.input_is_parallel:
        return None
    if not _row_fits(norm, linear, x, residual):
        return None
    row = norm_row_gemv_for(x, linear.weight, kernels.norm_row_gemv)
    if row is not None:
        return None if act_out else row.norm_row_gemv(x, residual, norm.weight, norm.eps, linear.weight,
                                                      linear.bias)[:2]
    mod = gemv_for(x, linear.weight, kernels.norm_gemv)
    if mod is None:
        return None
    return mod.rms_norm_gemv(x, residual, norm.weight, norm.eps, linear.weight, linear.bias, act_out=act_out)


def norm_route(norm: RMSNorm, router: LinearBase, x: torch.Tensor, residual: torch.Tensor | None):
    """(router(norm(x + residual)), x + residual, norm(x + residual)) in one launch (the norm_row_gemv switch,
    one 16-bit row on a GPU, rows of <= 2,048 features): an MoE block's router logits, the new residual, and the
    normed row its experts read; else None."""
    if router.quantized or router.input_is_parallel or not router.kernels.norm_row_gemv:
        return None
    if not _row_fits(norm, router, x, residual):
        return None
    row = norm_row_gemv_for(x, router.weight, True)
    if row is None:
        return None
    return row.norm_row_gemv(x, residual, norm.weight, norm.eps, router.weight, router.bias, normed_out=True)


def _row_fits(norm: RMSNorm, linear: LinearBase, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether the norm's output is exactly the projection's input row: one dtype (rms_norm would promote a mixed
    pair) and the norm's width the weight's K (a layer that feeds the projection more than the normed row, as
    EAGLE-3's concatenation does, keeps its own path)."""
    return (norm.weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype)
            and norm.weight.shape[-1] == linear.weight.shape[-1])


def _norm_fp8_linear(norm: RMSNorm, linear: LinearBase, x: torch.Tensor, residual: torch.Tensor | None):
    fused = fp8_fused_for(x, x.shape[-1])
    if (fused is None or linear.input_is_parallel or not linear.quant_method.takes_fp8_rows(linear, x)
            or norm.weight.dtype != x.dtype or (residual is not None and residual.dtype != x.dtype)):
        return None
    (xq, xs), summed = fused.rms_norm_quant_fp8(x, norm.weight, norm.eps, residual)
    return linear.forward_fp8_rows(xq, xs, x.dtype), (x if summed is None else summed)
