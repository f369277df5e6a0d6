"""A mixture-of-experts step's dense term: the experts its tokens route to, not every expert.

The step-time model prices a dense model's step by its weight bytes (or FLOPs). A MoE model holds many experts
and a step reads only those its tokens route to: one token of Qwen3-30B-A3B reads 8 of 128 experts a layer, a
batch of 256 nearly all of them. So the weight term here is the dense weights plus, per MoE layer, the expected
share of its experts a step of n tokens touches (planner/perf.expected_experts_touched: uniform routing), and
the FLOPs are the active parameters' (top-k experts a token).

A few experts' bytes do not stream at bandwidth: the grouped GEMM over 8 experts of one token is one short wave.
Each MoE layer's expert read therefore takes at least floor_s at the data sheet's bandwidth (calibration.toml
[moe] floor_us, fitted to W1 Qwen3-30B-A3B), which large batches never come near. The bytes keep the step
model's scale (a dtype's measured time: step_cost.DtypeTime).
"""

from __future__ import annotations

from meshserve.engine.step_time import StepTimeModel
from meshserve.planner.perf import expected_experts_touched
from meshserve.simulator.eager_steps import EagerStepModel


class MoeDense:
    """Mixed into a StepTimeModel: dense_s reads the dense weights plus, per MoE layer, max(the touched share of
    its experts' bytes, floor_s x bandwidth); weight_bytes is every weight's (all experts)."""

    def __init__(self, *args, expert_share: float, num_moe_layers: int, num_experts: int, top_k: int,
                 floor_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_experts, self.top_k, self.num_moe_layers = num_experts, top_k, num_moe_layers
        self._layer_bytes = self.weight_bytes * expert_share / num_moe_layers  # one layer's experts, all of them
        self._dense_bytes = self.weight_bytes * (1.0 - expert_share)
        self._floor_bytes = floor_s * self.rates.bandwidth
        self._bytes: dict[int, float] = {}  # by tokens in the step (at most the step's token budget)

    def step_weight_bytes(self, num_tokens: int) -> float:
        read = self._bytes.get(num_tokens)
        if read is None:
            touched = expected_experts_touched(self.num_experts, self.top_k, num_tokens) / self.num_experts
            layer = max(self._layer_bytes * touched, self._floor_bytes)
            read = self._bytes[num_tokens] = self._dense_bytes + self.num_moe_layers * layer
        return read

    def dense_s(self, num_tokens: int) -> float:
        return max(self.step_weight_bytes(num_tokens) / self.rates.bandwidth,
                   2.0 * self.params * num_tokens / self.rates.flops)


class MoeStepModel(MoeDense, StepTimeModel):
    pass


class MoeEagerStepModel(MoeDense, EagerStepModel):
    pass
