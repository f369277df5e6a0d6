"""Whether the fused Triton ops serve a tensor: on CUDA when Triton imports (and not disabled).

MESHSERVE_DISABLE_FUSED_OPS=1 turns every fused kernel off (the plain torch path, e.g. as a reference).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F


@functools.cache
def _triton_ops():
    try:
        from meshserve.kernels import triton_ops
    except ImportError:  # no Triton (CPU wheels): the torch path serves
        return None
    return triton_ops


def fused_ops_for(x: torch.Tensor):
    """The triton_ops module when x lives on a GPU and Triton is usable, else None."""
    if not x.is_cuda or os.environ.get("MESHSERVE_DISABLE_FUSED_OPS"):
        return None
    return _triton_ops()


@functools.cache
def _triton_gemv():
    try:
        from meshserve.kernels import triton_gemv
    except ImportError:
        return None
    return triton_gemv


def gemv_for(x: torch.Tensor, weight: torch.Tensor):
    """The Triton GEMV module when x is one row of 16-bit activations on a GPU (batch-1 decode, where
    cuBLAS leaves bandwidth unused), else None; fp32 keeps cuBLAS so reference runs stay exact."""
    if (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.numel() == x.shape[-1]
            and weight.dtype == x.dtype and not os.environ.get("MESHSERVE_DISABLE_FUSED_OPS")):
        return _triton_gemv()
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or the Triton GEMV where gemv_for allows it."""
    mod = gemv_for(x, weight)
    if mod is not None:
        return mod.gemv(x, weight, bias)
    return F.linear(x, weight, bias)
