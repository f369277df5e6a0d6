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
