"""Tile configs of the grouped MoE GEMM (kernels/triton_moe.py), one per stage, chosen by rows per expert.

The grouped GEMM pads each expert's run of (token, slot) rows to BLOCK_M, so the row count per expert
(pairs / experts) decides the config: Qwen3-30B-A3B (128 experts, top-8) at 256 decode tokens has about 16
rows per expert, DeepSeek-V2-Lite (64, top-6) about 24, and a 2,048-token prefill chunk 128 and 192.

"legacy" is the first table (BLOCK_M 64 from 2 rows per expert up: at 16 rows, 3/4 of every tile padding).
"tuned" follows the shapes vLLM measured on the H200 for E=128, N=768 (its per-shape JSON; our BLOCK_N is
per half of the fused gate/up output, so its gate_up N=256 is our 128), by the same rows-per-expert buckets:
  <= 2 rows    BLOCK_M 16, narrow N tiles: many programs over few rows, a weight stream
  <= 24 rows   BLOCK_M 32 (mostly one block per expert at decode 256 for both models), N 128 (gate_up) /
               256 (down), K 128, 2 stages
  <= 96 rows   BLOCK_M 64, N 64 / 128, K 64, 3 stages
  more         BLOCK_M 128, N 128 / 256, 8 warps, K 64, 3 stages (prefill chunks: compute-bound, big tiles)
fp8 experts and fp32 activations keep the legacy table (block-wise fp8 needs BLOCK_K 128; neither measured).
tools/bench_moe.py times the tables, and others, at the models' shapes.

"stream" (MESHSERVE_MOE_CONFIGS=stream; the candidate for decode of 3-24 rows per expert, DeepSeek-V2-Lite at
32-256 tokens, until measured) keeps tuned's tiles except in that bucket, where a decode step reads every
expert's weights (1.1 GB a layer for V2-Lite) and little else: BLOCK_M 64, so one block holds an expert's rows
(at 24 rows on average, BLOCK_M 32 cuts the ~4% of experts past 32 rows in two, and each half reads the
weights again) and tl.dot takes the Hopper wgmma path, whose pipeliner keeps num_stages buffers in flight;
BLOCK_K 64, 4 stages: 24 KB a stage, 96 KB a program, so two programs share an SM and one's prologue and
epilogue hide behind the other's stream; N 64 (gate_up: 22 column tiles x 64 experts = 1,408 programs) and
128 (down: 1,024). The tuned bucket's 2 stages are ONE shared buffer with mma.sync (sm_90 TTGIR: the
next K tile's copy waits for the current tile's dot) and 255 registers, one program an SM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GroupedGemmConfig:
    """One launch's tile shape: the Triton meta-parameters of _grouped_gemm_kernel."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StageConfigs:
    """The gate/up launch's config (BLOCK_N columns of gate and as many of up) and the down launch's."""

    gate_up: GroupedGemmConfig
    down: GroupedGemmConfig


def legacy_configs(pairs: int, num_experts: int, blockwise_fp8: bool) -> StageConfigs:
    """The first table: one config for both stages."""
    if pairs <= 2 * num_experts:
        cfg = GroupedGemmConfig(16, 64, 128, 1, 4, 3)
    else:
        cfg = GroupedGemmConfig(64, 128, 128 if blockwise_fp8 else 64, 8, 4, 3)
    return StageConfigs(cfg, cfg)


def tuned_configs(pairs: int, num_experts: int) -> StageConfigs:
    """16-bit experts: by rows per expert (module docstring)."""
    rows = pairs / num_experts
    if rows <= 2:
        return StageConfigs(GroupedGemmConfig(16, 32, 128, 1, 4, 4), GroupedGemmConfig(16, 64, 128, 1, 4, 4))
    if rows <= 24:
        return StageConfigs(
            GroupedGemmConfig(32, 128, 128, 16, 4, 2), GroupedGemmConfig(32, 256, 128, 16, 4, 2)
        )
    if rows <= 96:
        return StageConfigs(GroupedGemmConfig(64, 64, 64, 8, 4, 3), GroupedGemmConfig(64, 128, 64, 8, 4, 3))
    return StageConfigs(GroupedGemmConfig(128, 128, 64, 8, 8, 3), GroupedGemmConfig(128, 256, 64, 8, 8, 3))


def stream_configs(pairs: int, num_experts: int) -> StageConfigs:
    """16-bit experts: tuned_configs, with the weight-streaming decode tiles for 3-24 rows per expert."""
    rows = pairs / num_experts
    if 2 < rows <= 24:
        return StageConfigs(GroupedGemmConfig(64, 64, 64, 1, 4, 4), GroupedGemmConfig(64, 128, 64, 1, 4, 4))
    return tuned_configs(pairs, num_experts)


TABLES = ("tuned", "stream", "legacy")


def use_pair_gemv(num_tokens: int, pairs: int, num_experts: int) -> bool:
    """Whether triton_moe.fused_experts takes its pair GEMV instead of the grouped GEMM: one token (its top-k
    experts are distinct, each weight read once), or a few pairs among many experts (rarely sharing one: a
    shared expert would be read once per pair)."""
    return num_tokens == 1 or (pairs <= 16 and num_experts >= 4 * pairs)


def stage_configs(
    table: str, pairs: int, num_experts: int, quantized: bool, blockwise_fp8: bool, activation_bytes: int = 2
) -> StageConfigs:
    """The configs of `table` (TABLES) for this call. fp8 experts and fp32 activations (tests,
    references) always take legacy: the tuned tiles are sized for 16-bit operands in shared memory (at 4 bytes
    the 128 x 256 tiles would not fit an SM)."""
    if table == "legacy" or quantized or activation_bytes != 2:
        return legacy_configs(pairs, num_experts, blockwise_fp8)
    if table == "tuned":
        return tuned_configs(pairs, num_experts)
    if table == "stream":
        return stream_configs(pairs, num_experts)
    raise ValueError(f"unknown MoE config table {table!r} ({', '.join(TABLES)})")
