"""Routing functions: router logits [T, E] -> (weights [T, K] float32, expert ids [T, K] int32).

A routing function is a small object the MoE layer calls, so families that route differently (DeepSeek's
grouped top-k with a sigmoid score and a correction bias, Llama 4's sigmoid top-1) add an object here and reuse
the rest of the layer unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class RoutingFunction(Protocol):
    """Chooses each token's experts and their weights."""

    top_k: int

    def __call__(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def as_softmax_topk(self) -> tuple[int, bool, float] | None:
        """(top_k, renormalize, scaling) when this routing is a plain softmax top-k (one fused kernel serves
        it: kernels/moe.softmax_topk), else None."""
        ...


@dataclass(frozen=True)
class SoftmaxTopK:
    """Softmax over all experts (in float32), keep the top k; with `renormalize` the kept k are rescaled to
    sum to one. Mixtral always renormalizes; Qwen2/3-MoE do when the config's norm_topk_prob is set."""

    top_k: int
    renormalize: bool

    def __call__(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids.to(torch.int32)

    def as_softmax_topk(self) -> tuple[int, bool, float] | None:
        return self.top_k, self.renormalize, 1.0


@dataclass(frozen=True, eq=False)
class GroupedTopK:
    """DeepSeek's routing (HF DeepseekV2/V3TopkRouter), from float32 logits:

    scores       sigmoid (V3) or softmax (V2) of the logits
    choice       scores + correction_bias (V3's e_score_correction_bias: it steers which experts are chosen,
                 never their weights)
    groups       the E experts in num_groups equal groups, each scored by the sum of its top-2 choice values
                 (V3) or its max (V2's group_limited_greedy); only the topk_groups best groups stay eligible
    top k        of the eligible choice values; their weights are the plain scores, renormalized to sum to
                 one when `renormalize` (V3's norm_topk_prob), then times routed_scaling_factor

    num_groups = topk_groups = 1 is V2's plain greedy top-k. `correction_bias` is the router's own parameter
    (a reference, so loading it into the router updates the routing).
    """

    top_k: int
    num_groups: int
    topk_groups: int
    scoring: str  # "sigmoid" | "softmax"
    group_score: str  # "top2_sum" | "max"
    renormalize: bool
    scaling_factor: float
    correction_bias: torch.Tensor | None = None

    def __post_init__(self):
        if self.scoring not in ("sigmoid", "softmax") or self.group_score not in ("top2_sum", "max"):
            raise ValueError(f"unknown scoring {self.scoring!r} / group score {self.group_score!r}")

    def __call__(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = router_logits.float()
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.correction_bias is None else scores + self.correction_bias.float()
        if self.num_groups > 1 and self.topk_groups < self.num_groups:
            num_tokens, num_experts = choice.shape
            grouped = choice.view(num_tokens, self.num_groups, num_experts // self.num_groups)
            if self.group_score == "top2_sum":
                group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            else:
                group_scores = grouped.max(dim=-1).values
            group_idx = torch.topk(group_scores, k=self.topk_groups, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)
        ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling_factor, ids.to(torch.int32)

    def as_softmax_topk(self) -> tuple[int, bool, float] | None:
        # V2's greedy softmax (one group, or every group eligible) without a bias is a softmax top-k
        plain = self.num_groups == 1 or self.topk_groups >= self.num_groups
        if self.scoring != "softmax" or self.correction_bias is not None or not plain:
            return None
        return self.top_k, self.renormalize, self.scaling_factor
