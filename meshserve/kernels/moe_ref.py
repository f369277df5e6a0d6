"""The plain torch mixture-of-experts computation: a loop over the experts that received tokens.

`fused_experts_ref` is the reference for the Triton path (kernels/triton_moe.py, same signature) and the path
on CPUs. Each (token, slot) pair goes through its expert's gated MLP, down(silu(gate(x)) * up(x)), is scaled
by its routing weight and summed over the token's slots in float32. An expert id of -1 marks a slot served
elsewhere (another expert-parallel rank): it adds nothing here.

FP8 experts (w13 / w2 float8_e4m3fn, with scales) come in two layouts, and each projection is the dense
format's reference applied per expert, so activations are rounded exactly as a dense fp8 layer rounds them:
  per output channel   w13_scale [E, 2*I], w2_scale [E, H]; activations quantized per token
                       (quant_ref.fp8_linear_ref)
  block-wise (block)   w13_scale [E, 2*ceil(I/BN), ceil(H/BK)] (gate's row blocks, then up's: each starts on a
                       block of its own, as in the checkpoint), w2_scale [E, ceil(H/BN), ceil(I/BK)];
                       activations quantized per token and per BK features (fp8_block_ref.fp8_block_linear_ref)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meshserve.kernels.fp8_block_ref import fp8_block_linear_ref
from meshserve.kernels.quant_ref import fp8_linear_ref


def _gate_up(x: torch.Tensor, w13: torch.Tensor, scale: torch.Tensor | None,
             block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's gate and up projections of x [T, H] (w13 [2*I, H])."""
    if scale is None:
        return F.linear(x, w13).chunk(2, dim=-1)
    if block is None:
        return fp8_linear_ref(x, w13, scale).chunk(2, dim=-1)
    width, row_blocks = w13.shape[0] // 2, scale.shape[0] // 2
    return (fp8_block_linear_ref(x, w13[:width], scale[:row_blocks], block),
            fp8_block_linear_ref(x, w13[width:], scale[row_blocks:], block))


def _down(h: torch.Tensor, w2: torch.Tensor, scale: torch.Tensor | None,
          block: tuple[int, int] | None) -> torch.Tensor:
    if scale is None:
        return F.linear(h, w2)
    if block is None:
        return fp8_linear_ref(h, w2, scale)
    return fp8_block_linear_ref(h, w2, scale, block)


def fused_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                      w2_scale: torch.Tensor | None = None, block: tuple[int, int] | None = None,
                      shared_w13: torch.Tensor | None = None, shared_w2: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H]; w13 [E, 2*I, H] (gate rows then up rows); w2 [E, H, I]; topk_weights [T, K] (float32);
    topk_ids [T, K] local expert ids in [0, E) or -1; fp8 weights with their scales (module docstring).
    Returns [T, H] in x's dtype. A 16-bit shared MLP (shared_w13 [2*S*I, H], gate rows then up rows;
    shared_w2 [H, S*I]) is added to every token as S more experts of weight one, each I features of it."""
    num_experts = w13.shape[0]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    # which experts have work: one host sync, fine for the reference path
    for expert in torch.unique(flat_ids[flat_ids >= 0]).tolist():
        assert expert < num_experts, f"expert id {expert} out of range ({num_experts} local experts)"
        token, slot = torch.where(topk_ids == expert)
        gate, up = _gate_up(x[token], w13[expert], None if w13_scale is None else w13_scale[expert], block)
        y = _down(F.silu(gate) * up, w2[expert], None if w2_scale is None else w2_scale[expert], block)
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    if shared_w13 is not None:
        width, shared_width = w2.shape[2], shared_w2.shape[1]
        gate_rows, up_rows = shared_w13[:shared_width], shared_w13[shared_width:]
        for start in range(0, shared_width, width):
            part = slice(start, start + width)
            h = F.silu(F.linear(x, gate_rows[part])) * F.linear(x, up_rows[part])
            out += F.linear(h, shared_w2[:, part]).float()
    return out.to(x.dtype)


def softmax_topk_ref(router_logits: torch.Tensor, top_k: int, renormalize: bool, scaling: float = 1.0,
                     expert_load: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts in float32, the top k, renormalized to sum to one when `renormalize`, times
    `scaling` -> (weights [T, K] float32, ids [T, K] int32); each chosen expert counted into expert_load
    (int64 [E]) when given. The reference of kernels/triton_moe_routing.softmax_topk."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if expert_load is not None:
        flat = ids.reshape(-1)
        expert_load.scatter_add_(0, flat, torch.ones_like(flat))
    return weights * scaling if scaling != 1.0 else weights, ids.to(torch.int32)
