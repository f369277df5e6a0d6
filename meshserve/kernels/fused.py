"""Whether the fused Triton ops serve a tensor: on CUDA when Triton imports (and not disabled)."""

from __future__ import annotations

import functools
import os

import torch


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
