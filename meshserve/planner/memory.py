"""Memory arithmetic: weights by dtype, KV cache per token (GQA-correct), activations and overheads, per GPU.

All byte counts are plain bytes; "GB" in messages is 1e9 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from meshserve.errors import InvalidArgumentError
from meshserve.planner.hardware import GpuSpec
from meshserve.planner.model import ModelSpec
from meshserve.planner.parallel import Layout

INT4_GROUP_SIZE = 128
# Bytes per parameter of the quantizable linear layers. int4 (GPTQ/AWQ style) stores one fp16 scale and one
# 4-bit zero point per group of 128 weights; fp8/int8 per-channel scales are negligible.
WEIGHT_DTYPE_BYTES: dict[str, float] = {
    "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + (2 + 0.5) / INT4_GROUP_SIZE,
}
KV_DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
UNQUANTIZED_BYTES = 2  # embedding, LM head, norms and routers stay bf16 under weight quantization

CUDA_GRAPH_BYTES = 0.5e9  # captured decode graphs for ~35 batch sizes (vLLM reports 0.3-1 GiB)
FRAMEWORK_BYTES = 1.0e9  # CUDA context, cuBLAS/attention workspaces, allocator slack
COMM_BUFFER_BYTES = 0.3e9  # NCCL / custom all-reduce buffers, only when a replica spans GPUs
DEFAULT_MAX_BATCHED_TOKENS = 8192  # chunked-prefill token budget per step (vLLM's default for serving)
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


def weight_dtype_bytes(dtype: str) -> float:
    if dtype not in WEIGHT_DTYPE_BYTES:
        raise InvalidArgumentError(f"unknown weight dtype {dtype!r}; use one of {', '.join(WEIGHT_DTYPE_BYTES)}",
                                   param="dtype")
    return WEIGHT_DTYPE_BYTES[dtype]


def kv_dtype_bytes(dtype: str) -> int:
    if dtype not in KV_DTYPE_BYTES:
        raise InvalidArgumentError(f"unknown KV dtype {dtype!r}; use one of {', '.join(KV_DTYPE_BYTES)}",
                                   param="kv_dtype")
    return KV_DTYPE_BYTES[dtype]


def weight_bytes(model: ModelSpec, dtype: str = "bf16") -> float:
    """All weights of the model (every expert) in `dtype`; embedding, head and norms stay bf16."""
    other = model.total_params - model.linear_params
    return model.linear_params * weight_dtype_bytes(dtype) + other * UNQUANTIZED_BYTES


def kv_bytes_per_token(model: ModelSpec, kv_dtype: str = "bf16") -> int:
    """K and V for every layer: 2 × layers × KV heads × head_dim × bytes (KV heads, not query heads: GQA);
    MLA: layers × (kv_lora_rank + qk_rope_head_dim) × bytes."""
    return model.num_layers * model.kv_elements_per_token_layer * kv_dtype_bytes(kv_dtype)


def kv_tokens_held(model: ModelSpec, context_len: int) -> int:
    """Tokens of one sequence the cache must keep (a sliding window caps it)."""
    return min(context_len, model.sliding_window) if model.sliding_window else context_len


def kv_bytes(model: ModelSpec, context_len: int, concurrency: int = 1, kv_dtype: str = "bf16") -> int:
    """KV cache for `concurrency` sequences of `context_len` tokens each, whole model."""
    return concurrency * kv_tokens_held(model, context_len) * kv_bytes_per_token(model, kv_dtype)


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage: contiguous slices, the first stages take the remainder."""
    base, extra = divmod(num_layers, pp)
    return [base + (1 if s < extra else 0) for s in range(pp)]


def kv_heads_per_gpu(model: ModelSpec, tp: int) -> int:
    # When TP exceeds the KV-head count, each GPU keeps one (replicated) KV head.
    return max(1, model.num_kv_heads // tp)


@dataclass(frozen=True)
class StageShard:
    """What one GPU of one pipeline stage holds (bytes) and how many layers it runs."""

    stage: int
    num_layers: int
    num_moe_layers: int
    dense_weight_bytes: float  # everything but routed experts: attention, dense MLPs, norms, embedding/head
    expert_slice_bytes: float  # one routed expert as held on this GPU (whole with EP, 1/tp without)
    experts_per_gpu: int  # routed experts held per MoE layer
    kv_bytes_per_token: float  # this GPU's share of one token's KV
    unquantized_bytes: float = 0.0  # the part of dense_weight_bytes kept bf16: embedding/head, norms, routers, biases

    @property
    def weight_bytes(self) -> float:
        return self.dense_weight_bytes + self.num_moe_layers * self.experts_per_gpu * self.expert_slice_bytes

    @property
    def linear_weight_bytes(self) -> float:
        """The projections and experts this GPU holds (what a prefill streams; not the embedding's table)."""
        return self.weight_bytes - self.unquantized_bytes


def stage_shard(model: ModelSpec, layout: Layout, stage: int, weight_dtype: str = "bf16",
                kv_dtype: str = "bf16", layer_partition: Sequence[int] | None = None) -> StageShard:
    """The slice of the model one GPU of pipeline stage `stage` holds under `layout` (layer_partition: layers
    per stage, the engine's --pp-layer-partition; None: stage_layers' even split)."""
    tp, wb, ub = layout.tp, weight_dtype_bytes(weight_dtype), UNQUANTIZED_BYTES
    parts = layer_partition or stage_layers(model.num_layers, layout.pp)
    start, layers = sum(parts[:stage]), parts[stage]
    moe_layers = model.moe_layers_in(start, start + layers)
    dense_layers = layers - moe_layers
    kv_heads = kv_heads_per_gpu(model, tp)
    if model.is_mla:  # heads split over TP; q_a / kv_a replicated
        split = model.q_params + model.kv_params + model.o_params - model.mla_replicated_params
        attn = (split / tp + model.mla_replicated_params) * wb
    else:
        attn = ((model.q_params + model.o_params) / tp + 2 * model.hidden_size * kv_heads * model.head_dim) * wb
    plain = layers * (model.attn_bias_params / tp + model.norm_params_per_layer) * ub
    plain += moe_layers * model.router_params * ub
    if stage == 0:
        plain += model.embedding_params / tp * ub  # vocab-parallel embedding
    if stage == layout.pp - 1:
        # The head is vocab-parallel too; a tied head on a separate last stage needs its own copy.
        head = model.lm_head_params or (model.embedding_params if layout.pp > 1 else 0)
        plain += head / tp * ub + model.hidden_size * ub
    dense = layers * attn + dense_layers * model.dense_mlp_params / tp * wb
    dense += moe_layers * model.shared_expert_params / tp * wb + plain
    if layout.ep > 1:
        expert_slice, experts_per_gpu = model.expert_params * wb, model.num_experts // layout.ep
    else:
        expert_slice, experts_per_gpu = model.expert_params * wb / tp, model.num_experts
    # MLA: the latent is replicated, every GPU caches all of it
    per_layer = model.kv_elements_per_token_layer if model.is_mla else 2 * kv_heads * model.head_dim
    kv_per_token = layers * per_layer * kv_dtype_bytes(kv_dtype)
    return StageShard(stage, layers, moe_layers, dense, expert_slice, experts_per_gpu, kv_per_token, plain)


def activation_bytes(model: ModelSpec, layout: Layout, max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS,
                     max_num_seqs: int = DEFAULT_MAX_NUM_SEQS) -> float:
    """Peak transient memory of one forward pass: the widest layer's bf16 activations for a full token budget
    (residual + normed hidden, q/k/v, gate/up output and its activation) plus fp32 logits for sampling."""
    tp = layout.tp
    qkv = (model.num_heads + 2 * kv_heads_per_gpu(model, tp) * tp) * model.head_dim / tp
    mlp = 3 * model.intermediate_size / tp if model.num_dense_layers else 0
    if model.is_moe:
        moe_width = model.moe_intermediate_size / (1 if layout.ep > 1 else tp)
        mlp = max(mlp, 3 * model.experts_per_token * moe_width)
    per_token = 2 * model.hidden_size + max(qkv, mlp)
    # one row per sequence sampled in a step, and a step schedules at most max_batched_tokens tokens
    # (--max-num-seqs 100000 sized 51 TB of logits for the 8B: "no fit" on any number of GPUs)
    logits = min(max_num_seqs, max_batched_tokens) * model.vocab_size / tp * 4
    return max_batched_tokens * per_token * 2 + logits


def overhead_bytes(layout: Layout, enforce_eager: bool = False) -> float:
    """Framework memory outside weights, KV and activations."""
    extra = COMM_BUFFER_BYTES if layout.gpus_per_replica > 1 or layout.ep > 1 else 0.0
    return FRAMEWORK_BYTES + (0.0 if enforce_eager else CUDA_GRAPH_BYTES) + extra


@dataclass(frozen=True)
class MemoryBreakdown:
    """Per-GPU memory of the most loaded pipeline stage, for `kv_tokens` tokens of KV per replica."""

    weights: float
    kv: float
    activations: float
    overhead: float
    capacity: float
    budget: float  # capacity × gpu_memory_utilization
    kv_bytes_per_token: float  # per GPU, most loaded stage
    max_kv_tokens: int  # tokens of KV per replica that fit beside weights/activations/overhead

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def describe(self) -> str:
        gb = 1e9
        return (f"{self.total / gb:.1f} GB per GPU (weights {self.weights / gb:.1f} + KV {self.kv / gb:.1f} "
                f"+ activations {self.activations / gb:.1f} + overhead {self.overhead / gb:.1f}) "
                f"{'<=' if self.fits else '>'} {self.budget / gb:.1f} GB usable")


def memory_per_gpu(model: ModelSpec, layout: Layout, gpu: GpuSpec, kv_tokens: int, *,
                   weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                   max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
                   gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
                   enforce_eager: bool = False) -> MemoryBreakdown:
    """Memory of one GPU holding its share of the model plus `kv_tokens` tokens of KV (per replica)."""
    act = activation_bytes(model, layout, max_batched_tokens, max_num_seqs)
    ovh = overhead_bytes(layout, enforce_eager)
    budget = gpu.memory_bytes * gpu_memory_utilization
    shards = [stage_shard(model, layout, s, weight_dtype, kv_dtype) for s in range(layout.pp)]
    worst = max(shards, key=lambda sh: sh.weight_bytes + kv_tokens * sh.kv_bytes_per_token)
    max_tokens = min(max(0.0, budget - sh.weight_bytes - act - ovh) / sh.kv_bytes_per_token for sh in shards)
    return MemoryBreakdown(weights=worst.weight_bytes, kv=kv_tokens * worst.kv_bytes_per_token, activations=act,
                           overhead=ovh, capacity=gpu.memory_bytes, budget=budget,
                           kv_bytes_per_token=worst.kv_bytes_per_token, max_kv_tokens=math.floor(max_tokens))
