"""Mixture-of-experts members of the Llama family: Mixtral, Qwen2-MoE (with a gated shared expert) and Qwen3-MoE. Attention, norms and embeddings are llama.py's; only the MLP of the sparse layers differs: a router
(one replicated linear), a routing function (layers/moe_routing.py) and the routed experts (layers/fused_moe.py),
plus an optional shared expert for the families that have one.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from meshserve.layers.fused_moe import EXPERT_PROJECTIONS, FusedMoE
from meshserve.layers.linear import ReplicatedLinear
from meshserve.layers.moe_routing import RoutingFunction, SoftmaxTopK
from meshserve.layers.norm import RMSNorm
from meshserve.layers.norm_linear import norm_route
from meshserve.models.llama import LlamaForCausalLM, LlamaMLP
from meshserve.models.moe_config import expert_intermediate_size, is_sparse_layer, num_experts

# model.layers.{i}.mlp.experts.{e}.{w1|w2|w3|gate_proj|up_proj|down_proj}.{weight|weight_scale_inv}
_ONE_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.(weight|weight_scale_inv)$")
# transformers 5's stacked form: model.layers.{i}.mlp.experts.{gate_up_proj|down_proj}
_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class SparseMoeBlock(nn.Module):
    """router -> routing function -> routed experts (+ shared expert, when the family has one).

    `shared_expert` is any module mapping hidden -> hidden (a dense MLP, reduced over TP), added to every
    token's routed output; `shared_expert_gate` (Qwen2-MoE) scales it by sigmoid(gate(x)) per token.
    """

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int, routing: RoutingFunction,
                 shared_expert: nn.Module | None = None, shared_expert_gate: nn.Module | None = None):
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, routing)
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.experts.routes_with_router(hidden):  # (one token: the router's GEMV and the routing in one launch)
            out = self.experts.forward_with_router(hidden, self.gate)
        else:
            out = self.experts(hidden, self.gate(hidden))
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden)) * shared
            out = out + shared
        return out

    def norm_forward(self, norm: RMSNorm, hidden: torch.Tensor,
                     residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(forward(norm(hidden + residual)), hidden + residual) with the residual add, the norm and the router's
        GEMV in one launch that also writes the normed row for the experts (layers/norm_linear.norm_route: batch
        1, the norm_row_gemv switch), where no shared expert reads the normed row too and the router GEMV does not
        route itself (routes_with_router); else None (the decoder layer's norm, then forward)."""
        if self.shared_expert is not None or self.experts.routes_with_router(hidden):
            return None
        routed = norm_route(norm, self.gate, hidden, residual)
        if routed is None:
            return None
        logits, residual, normed = routed
        return self.experts(normed, logits), residual


class MoeForCausalLM(LlamaForCausalLM):
    """A Llama-family decoder whose sparse layers route each token to top-k experts."""

    def routing(self) -> RoutingFunction:
        raise NotImplementedError

    def make_mlp(self, layer: int) -> nn.Module | None:
        cfg = self.config
        if not is_sparse_layer(cfg, layer):
            return LlamaMLP(cfg)  # dense layer of a mixed model (Qwen's mlp_only_layers / sparse step)
        return SparseMoeBlock(cfg.hidden_size, num_experts(cfg), expert_intermediate_size(cfg), self.routing())

    def expert_checkpoint_name(self, name: str) -> tuple[str, tuple[int | None, str]] | None:
        """A routed expert's checkpoint tensor -> (our stacked parameter, (expert id or None, part))."""
        m = _ONE_EXPERT.match(name)
        if m and m.group(3) in EXPERT_PROJECTIONS:
            part = EXPERT_PROJECTIONS[m.group(3)]
            param = f"{'w2' if part == 'down' else 'w13'}_{m.group(4)}"
            return f"{m.group(1)}.{param}", (int(m.group(2)), part)
        m = _STACKED.match(name)
        if m:
            stacked = m.group(2) == "gate_up_proj"
            return f"{m.group(1)}.{'w13_weight' if stacked else 'w2_weight'}", (None, "gate_up" if stacked else "down")
        return None

    def expert_layers(self) -> list[FusedMoE]:
        """This stage's routed-expert layers, in layer order."""
        return [m for m in self.modules() if isinstance(m, FusedMoE)]


class MixtralForCausalLM(MoeForCausalLM):
    """Mixtral: every layer sparse, softmax over the experts, top-k, renormalized (HF MixtralTopKRouter).
    Its checkpoints call the block `block_sparse_moe`; it is `mlp` here, as in transformers 5."""

    def routing(self) -> RoutingFunction:
        return SoftmaxTopK(self.config.num_experts_per_tok, renormalize=True)

    def checkpoint_name(self, name: str) -> str | None:
        return super().checkpoint_name(name.replace(".block_sparse_moe.", ".mlp."))


class Qwen3MoeForCausalLM(MoeForCausalLM):
    """Qwen3-MoE: Qwen3 attention (q/k RMSNorm), softmax top-k renormalized when norm_topk_prob; dense
    layers where mlp_only_layers / decoder_sparse_step say so."""

    def routing(self) -> RoutingFunction:
        return SoftmaxTopK(self.config.num_experts_per_tok, renormalize=bool(self.config.norm_topk_prob))


class Qwen2MoeForCausalLM(MoeForCausalLM):
    """Qwen2-MoE: Qwen2 attention (QKV bias), softmax top-k (renormalized when norm_topk_prob) plus a shared
    expert every token goes through, scaled by sigmoid(shared_expert_gate(x))."""

    def routing(self) -> RoutingFunction:
        return SoftmaxTopK(self.config.num_experts_per_tok, renormalize=bool(self.config.norm_topk_prob))

    def make_mlp(self, layer: int) -> nn.Module | None:
        cfg = self.config
        if not is_sparse_layer(cfg, layer):
            return LlamaMLP(cfg)
        return SparseMoeBlock(cfg.hidden_size, num_experts(cfg), expert_intermediate_size(cfg), self.routing(),
                              shared_expert=LlamaMLP(cfg, cfg.shared_expert_intermediate_size),
                              shared_expert_gate=ReplicatedLinear(cfg.hidden_size, 1, bias=False))
