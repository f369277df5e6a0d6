"""Whether a fused Triton op serves a given tensor, once the backend selection has allowed it.

Whether the fused ops and the GEMV may be used at all is decided once, from the engine config, by
meshserve's backend selection (layers/backend_selection.py), which passes `enabled` down to the layers. What
stays here is what only the call can know: the tensor's device, shape and dtype, and whether Triton imports.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F


@functools.cache
def triton_module(name: str):
    """meshserve.kernels.<name>, a module of Triton kernels, or None where Triton does not import (CPU wheels:
    the torch path serves). Imported on first use, once."""
    try:
        return importlib.import_module(f"meshserve.kernels.{name}")
    except ImportError:
        return None


# module globals, so a tool or test can swap one out (tools/bench_fp8_step.py turns the fused fp8 kernels off)
_triton_ops = functools.partial(triton_module, "triton_ops")
_triton_gemv = functools.partial(triton_module, "triton_gemv")
_triton_norm_row_gemv = functools.partial(triton_module, "triton_norm_row_gemv")
_triton_skinny_gemv = functools.partial(triton_module, "triton_skinny_gemv")
_triton_decode_gemm = functools.partial(triton_module, "triton_decode_gemm")
_triton_fp8_fused = functools.partial(triton_module, "triton_fp8_fused")


def fp8_fused_for(x: torch.Tensor, cols: int):
    """The triton_fp8_fused module (a producer kernel that also quantizes its output rows to fp8) when x is on
    a GPU, Triton imports and rows of `cols` features fit it, else None. The caller has checked that the next
    projection takes fp8 rows (LinearMethod.takes_fp8_rows), which implies the fused ops are selected."""
    if not x.is_cuda:
        return None
    mod = _triton_fp8_fused()
    return mod if mod is not None and mod.fits(cols) else None


def fused_ops_importable() -> bool:
    """Whether the fused Triton ops (norm, rotary, SiLU, prologue, sampling) import here."""
    return _triton_ops() is not None


def gemv_importable() -> bool:
    """Whether the Triton GEMV imports here."""
    return _triton_gemv() is not None


def fused_ops_for(x: torch.Tensor, enabled: bool):
    """The triton_ops module when the fused ops are enabled, x lives on a GPU and Triton is usable, else None."""
    if not enabled or not x.is_cuda:
        return None
    return _triton_ops()


def gemv_for(x: torch.Tensor, weight: torch.Tensor, enabled: bool):
    """The Triton GEMV module when enabled and x is one row of 16-bit activations on a GPU (batch-1 decode,
    where cuBLAS leaves bandwidth unused), else None; fp32 keeps cuBLAS so reference runs stay exact."""
    if (enabled and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.numel() == x.shape[-1]
            and weight.dtype == x.dtype):
        return _triton_gemv()
    return None


def norm_row_gemv_for(x: torch.Tensor, weight: torch.Tensor, enabled: bool):
    """The one-launch norm + GEMV module (kernels/triton_norm_row_gemv.py) where gemv_for serves x and the
    weight's rows are short enough for it to hold whole, else None."""
    if gemv_for(x, weight, enabled) is None:
        return None
    mod = _triton_norm_row_gemv()
    return mod if mod is not None and mod.fits(weight.shape[1]) else None


def skinny_gemv_for(x: torch.Tensor, weight: torch.Tensor, enabled: bool):
    """The Triton skinny GEMV module when enabled and x holds 2 to MAX_ROWS rows of 16-bit activations on a
    GPU (a speculative verify step at small batch), else None."""
    if not (enabled and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype):
        return None
    mod = _triton_skinny_gemv()
    rows = x.numel() // max(x.shape[-1], 1)
    return mod if mod is not None and 2 <= rows <= mod.MAX_ROWS else None


def decode_gemm_for(x: torch.Tensor, weight: torch.Tensor, enabled: bool):
    """The Triton decode GEMM module (kernels/triton_decode_gemm.py) when enabled and x holds a decode step's
    2 to MAX_ROWS_16BIT rows of 16-bit activations on a GPU, else None."""
    if not (enabled and x.is_cuda):
        return None
    mod = _triton_decode_gemm()
    return mod if mod is not None and mod.fits_16bit(x, weight) else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gemv: bool = False, skinny: bool = False, decode_gemm: bool = False) -> torch.Tensor:
    """F.linear, or the Triton GEMV where `gemv` is enabled and gemv_for allows it (one row), or the skinny
    GEMV where `skinny` is enabled and skinny_gemv_for allows it (a few rows), or the decode GEMM where
    `decode_gemm` is enabled and decode_gemm_for allows it (a decode step's rows)."""
    mod = gemv_for(x, weight, gemv)
    if mod is not None:
        return mod.gemv(x, weight, bias)
    skinny_mod = skinny_gemv_for(x, weight, skinny)
    if skinny_mod is not None:
        return skinny_mod.skinny_gemv(x, weight, bias)
    gemm_mod = decode_gemm_for(x, weight, decode_gemm)
    if gemm_mod is not None:
        return gemm_mod.gemm_16bit(x, weight, bias)
    return F.linear(x, weight, bias)
