"""The plain torch mixture-of-experts computation: a loop over the experts that received tokens.

`fused_experts_ref` is the reference for the Triton path (kernels/triton_moe.py, same signature) and the path
on CPUs. Each (token, slot) pair goes through its expert's gated MLP, down(silu(gate(x)) * up(x)), is scaled
by its routing weight and summed over the token's slots in float32. An expert id of -1 marks a slot served
elsewhere (another expert-parallel rank): it adds nothing here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H]; w13 [E, 2*I, H] (gate rows then up rows); w2 [E, H, I]; topk_weights [T, K] (float32);
    topk_ids [T, K] local expert ids in [0, E) or -1. Returns [T, H] in x's dtype."""
    num_experts = w13.shape[0]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    # which experts have work: one host sync, fine for the reference path
    for expert in torch.unique(flat_ids[flat_ids >= 0]).tolist():
        assert expert < num_experts, f"expert id {expert} out of range ({num_experts} local experts)"
        token, slot = torch.where(topk_ids == expert)
        gate, up = F.linear(x[token], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(x.dtype)
