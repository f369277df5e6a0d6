"""RMSNorm (+ residual add) folded into the next projection: one Triton GEMV at batch-1 decode.

A decoder layer runs `rms_norm(x, residual)` and then the QKV (or gate/up) projection; at batch 1 both are
GEMV-sized and the norm is one more launch and gap per pair (~2 x 32 per step of Llama-3.1-8B). With the
selection's norm_gemv switch, norm_linear does both in triton_gemv.rms_norm_gemv, with the norm's roundings: a
one-program kernel for h = x + residual and 1 / rms(h), then the GEMV scaling h on load (no normed row).
Where that path does not apply it returns None and the caller keeps the two-module path beside it.
"""

from __future__ import annotations

import torch

from meshserve.kernels.fused import gemv_for
from meshserve.layers.linear import LinearBase
from meshserve.layers.norm import RMSNorm


def norm_linear(
    norm: RMSNorm, linear: LinearBase, x: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(linear(norm(x + residual)), x + residual) — without a residual (linear(norm(x)), x) — in the fold, or
    None where that path does not apply: the switch is off, x is not one 16-bit row on a GPU (gemv_for), the
    weight is quantized, or the projection's input is split across ranks (row-parallel: its input is not the
    whole normed row). Column-parallel QKV / gate_up take the replicated row, so TP keeps the fused path."""
    if not linear.kernels.norm_gemv or linear.quantized or linear.input_is_parallel:
        return None
    mod = gemv_for(x, linear.weight, True)
    if mod is None or norm.weight.dtype != x.dtype or (residual is not None and residual.dtype != x.dtype):
        return None
    return mod.rms_norm_gemv(x, residual, norm.weight, norm.eps, linear.weight, linear.bias)
