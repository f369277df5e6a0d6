"""Bytes the expert-parallel token exchange moves per step, as the engine does it (layers/fused_moe.py):
experts spread over the TP group, each rank routing a 1/EP slice of the batch.

Per MoE layer and GPU, with T tokens in the step, hidden size h, top-k routing over E experts (uniform):
  dispatch    its T/EP tokens, each once to every other rank holding at least one of its k experts
              (r = (EP-1) × (1 - C(E - E/EP, k) / C(E, k)) ranks per token), with k ids and k weights
  combine     the same rows back (hidden only)
  all-gather  the slices, to give every rank the whole batch again: (EP-1)/EP × T × h
Beside it, TP without EP moves one all-reduce of T × h per MoE layer (2 (TP-1)/TP of it per GPU, ring).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from meshserve.planner.model import ModelSpec

ACT_BYTES = 2  # bf16 activations
META_BYTES = 4  # each routed slot's expert id and weight travel as float32


def remote_ranks_per_token(num_experts: int, top_k: int, ep: int) -> float:
    """Expected other ranks a token's top-k experts live on (uniform routing, experts in equal blocks)."""
    if ep <= 1 or num_experts == 0:
        return 0.0
    per_rank = num_experts // ep
    miss = comb(num_experts - per_rank, top_k) / comb(num_experts, top_k)  # none of its k on that rank
    return (ep - 1) * (1 - miss)


@dataclass(frozen=True)
class EpTraffic:
    """Bytes one GPU sends per step over all the MoE layers of its stage."""

    dispatch: float
    combine: float
    all_gather: float

    @property
    def all_to_all(self) -> float:
        return self.dispatch + self.combine

    @property
    def total(self) -> float:
        return self.dispatch + self.combine + self.all_gather


def ep_traffic(model: ModelSpec, ep: int, tokens: int, moe_layers: int) -> EpTraffic:
    """EP traffic of a step of `tokens` tokens through `moe_layers` MoE layers (zero without EP)."""
    if ep <= 1 or not model.is_moe:
        return EpTraffic(0.0, 0.0, 0.0)
    rows = tokens / ep * remote_ranks_per_token(model.num_experts, model.experts_per_token, ep)
    hidden = model.hidden_size * ACT_BYTES
    dispatch = rows * (hidden + 2 * model.experts_per_token * META_BYTES)
    gather = (ep - 1) / ep * tokens * hidden
    return EpTraffic(moe_layers * dispatch, moe_layers * rows * hidden, moe_layers * gather)


def tp_moe_all_reduce_bytes(model: ModelSpec, tp: int, tokens: int, moe_layers: int) -> float:
    """What TP without EP sends per GPU for the same MoE layers: one ring all-reduce of T × h each."""
    if tp <= 1:
        return 0.0
    return moe_layers * 2 * (tp - 1) / tp * tokens * model.hidden_size * ACT_BYTES
