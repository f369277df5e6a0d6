"""Which mixture-of-experts path serves a call: the Triton kernels (kernels/triton_moe.py) on a GPU where the
backend selection enabled fused ops, else the torch reference (kernels/moe_ref.py). Same signature, same math."""

from __future__ import annotations

import functools

import torch

from meshserve.kernels.moe_ref import fused_experts_ref


@functools.cache
def _triton_moe():
    try:
        from meshserve.kernels import triton_moe
    except ImportError:  # no Triton (CPU wheels): the reference serves
        return None
    return triton_moe


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, triton: bool = False, **fp8_scales) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) for every token t (ids of -1 skipped);
    fp8_scales: w13_scale, w2_scale and block for fp8 experts (kernels/moe_ref.py)."""
    mod = _triton_moe() if triton and x.is_cuda else None
    if mod is not None:
        return mod.fused_experts(x, w13, w2, topk_weights, topk_ids, **fp8_scales)
    return fused_experts_ref(x, w13, w2, topk_weights, topk_ids, **fp8_scales)
