"""Which mixture-of-experts path serves a call: the Triton kernels on a GPU where the backend selection
enabled fused ops, else the torch reference (kernels/moe_ref.py). Same signature, same math.

Triton paths (layers/backend_selection.py's `moe_legacy` forces the first, for A/B runs):
  legacy   triton_moe.fused_experts with its first tile configs and its pair GEMV (torch routing)
  default  small batches of 16-bit experts (triton_moe_gemv.serves: one token, or <= 64 pairs and no more
           pairs than experts): triton_moe_gemv, two launches reading only the chosen experts' weights;
           else (and for fp8 experts) triton_moe.fused_experts: Triton align, kernels/moe_configs.py's tuned
           tiles, one combine launch. Routing is one launch (triton_moe_routing) where it is a softmax top-k
"""

from __future__ import annotations

import functools

import torch

from meshserve.kernels.moe_ref import fused_experts_ref, softmax_topk_ref


@functools.cache
def _triton_moe():
    try:
        from meshserve.kernels import triton_moe, triton_moe_gemv, triton_moe_routing
    except ImportError:  # no Triton (CPU wheels): the reference serves
        return None
    return triton_moe, triton_moe_gemv, triton_moe_routing


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    triton: bool = False,
    legacy: bool = False,
    **fp8_scales,
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) for every token t (ids of -1 skipped);
    fp8_scales: w13_scale, w2_scale and block for fp8 experts (kernels/moe_ref.py)."""
    mods = _triton_moe() if triton and x.is_cuda else None
    if mods is None:
        return fused_experts_ref(x, w13, w2, topk_weights, topk_ids, **fp8_scales)
    grouped, gemv, _ = mods
    if legacy:
        return grouped.fused_experts(x, w13, w2, topk_weights, topk_ids, configs="legacy", **fp8_scales)
    if fp8_scales.get("w13_scale") is None and gemv.serves(x.shape[0], topk_ids.numel(), w13.shape[0]):
        return gemv.moe_gemv(x, w13, w2, topk_weights, topk_ids)
    return grouped.fused_experts(x, w13, w2, topk_weights, topk_ids, **fp8_scales)


def softmax_topk(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    scaling: float = 1.0,
    expert_load: torch.Tensor | None = None,
    triton: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing (moe_ref.softmax_topk_ref), counting the chosen experts into expert_load."""
    mods = _triton_moe() if triton and router_logits.is_cuda else None
    if mods is None:
        return softmax_topk_ref(router_logits, top_k, renormalize, scaling, expert_load)
    return mods[2].softmax_topk(router_logits, top_k, renormalize, scaling, expert_load)
