"""Weights by dtype, GQA-correct KV cache, and per-GPU memory for a layout ("GB" = 1e9 bytes)."""

import pytest

from meshserve.planner.hardware import get_gpu
from meshserve.planner.memory import (
    kv_bytes,
    kv_bytes_per_token,
    memory_per_gpu,
    stage_layers,
    stage_shard,
    weight_bytes,
)
from meshserve.planner.model import load_model
from meshserve.planner.parallel import Layout


def test_llama_70b_weights_and_kv():
    m = load_model("llama-3.1-70b")
    assert round(weight_bytes(m, "bf16") / 1e9, 1) == 141.1
    assert kv_bytes_per_token(m, "bf16") == 327_680  # 2 × 80 layers × 8 KV heads × 128 × 2 B
    assert round(kv_bytes(m, 128 * 1024, 1, "bf16") / 1e9, 1) == 42.9


def test_gqa_kv_is_not_the_naive_query_head_figure():
    m = load_model("llama-3.1-70b")
    naive = 2 * m.num_layers * m.num_heads * m.head_dim * 2 * 128 * 1024  # 64 heads: 8× too big
    assert kv_bytes(m, 128 * 1024) * 8 == naive and naive > 160e9


def test_llama_8b_and_405b():
    m8, m405 = load_model("llama-3.1-8b"), load_model("llama-3.1-405b")
    assert round(weight_bytes(m8) / 1e9, 2) == 16.06
    assert kv_bytes_per_token(m8) == 131_072
    assert round(weight_bytes(m405) / 1e9) == 812 and 811e9 < weight_bytes(m405) < 812e9
    assert kv_bytes_per_token(m405) == 516_096


def test_weight_dtypes_quantize_only_linear_layers():
    m = load_model("llama-3.1-70b")
    other = (m.total_params - m.linear_params) * 2  # embedding, head, norms stay bf16
    assert weight_bytes(m, "fp8") == m.linear_params + other
    assert weight_bytes(m, "int8") == weight_bytes(m, "fp8")
    int4 = weight_bytes(m, "int4")
    assert int4 == pytest.approx(m.linear_params * (0.5 + 2.5 / 128) + other)  # fp16 scale + 4-bit zero / 128
    assert 36e9 < int4 < 40e9


def test_kv_dtype_fp8_halves_kv():
    m = load_model("llama-3.1-8b")
    assert kv_bytes_per_token(m, "fp8") * 2 == kv_bytes_per_token(m, "bf16")


def test_tp4_shard_of_70b_is_a_quarter():
    m = load_model("llama-3.1-70b")
    shard = stage_shard(m, Layout(tp=4), 0)
    assert round(shard.weight_bytes / 1e9, 1) == 35.3
    assert shard.kv_bytes_per_token * 4 == kv_bytes_per_token(m)


def test_kv_heads_replicate_when_tp_exceeds_them():
    m = load_model("qwen3-30b-a3b")  # 4 KV heads
    assert stage_shard(m, Layout(tp=8), 0).kv_bytes_per_token == 2 * 48 * 1 * 128 * 2


def test_pipeline_stages_split_layers_and_embeddings():
    m = load_model("llama-3.1-405b")
    assert stage_layers(126, 2) == [63, 63] and stage_layers(10, 3) == [4, 3, 3]
    first, last = stage_shard(m, Layout(tp=8, pp=2), 0), stage_shard(m, Layout(tp=8, pp=2), 1)
    # norms are replicated on every TP rank, hence approx
    assert first.weight_bytes + last.weight_bytes == pytest.approx(weight_bytes(m) / 8, rel=1e-4)


def test_moe_expert_parallel_spreads_whole_experts():
    m = load_model("mixtral-8x7b")
    sliced, spread = stage_shard(m, Layout(tp=8), 0), stage_shard(m, Layout(tp=8, ep=8), 0)
    assert spread.experts_per_gpu == 1 and sliced.experts_per_gpu == 8
    assert spread.weight_bytes >= sliced.weight_bytes  # attention is still TP-sliced either way


def test_memory_breakdown_per_gpu():
    m, gpu = load_model("llama-3.1-70b"), get_gpu("H100-SXM")
    mem = memory_per_gpu(m, Layout(tp=4), gpu, kv_tokens=128 * 1024)
    assert mem.fits and round(mem.kv / 1e9, 1) == 10.7 and 0 < mem.activations < 2e9 and mem.overhead > 1e9
    assert not memory_per_gpu(m, Layout(tp=2), gpu, kv_tokens=128 * 1024).fits
    assert mem.max_kv_tokens * mem.kv_bytes_per_token <= mem.budget - mem.weights


def test_pipeline_stages_count_their_own_moe_layers():
    # DeepSeek-V3's 3 dense layers (0-2) sit on the first stage: 28 + 30 MoE layers over PP=2, not 29 + 29
    m = load_model("deepseek-v3")
    shards = [stage_shard(m, Layout(tp=8, pp=2), s, "fp8") for s in range(2)]
    assert [s.num_layers for s in shards] == [31, 30]
    assert [s.num_moe_layers for s in shards] == [31 - 3, 30]
    four = [stage_shard(m, Layout(tp=8, pp=4), s, "fp8").num_moe_layers for s in range(4)]
    assert four == [16 - 3, 15, 15, 15] and sum(four) == m.num_moe_layers  # rounding shares gave 57
    # the last stage holds 30 layers of 256 experts, each sliced 8 ways at 1 B per weight
    assert shards[1].weight_bytes - shards[1].dense_weight_bytes == 30 * 256 * m.expert_params / 8
    # and the most loaded stage is what a GPU of the layout must hold
    mem = memory_per_gpu(m, Layout(tp=8, pp=2), get_gpu("H200"), 4096, weight_dtype="fp8")
    assert mem.weights == shards[1].weight_bytes


def test_logits_are_sized_for_the_sequences_a_step_can_sample():
    """A step samples one row per scheduled sequence, at most max_batched_tokens of them: --max-num-seqs 100000
    sized 100,000 x 128,256 x 4 B = 51 GB of logits for the 8B (on one H200: 393 concurrent where 673 fit), 10^8
    51 TB, a "no fit" on any number of GPUs."""
    from meshserve.planner.memory import activation_bytes

    m = load_model("llama-3.1-8b")
    capped = activation_bytes(m, Layout(), max_batched_tokens=8192, max_num_seqs=100_000)
    assert capped == activation_bytes(m, Layout(), max_batched_tokens=8192, max_num_seqs=8192)
    assert capped < 6e9
    # below the token budget the sequences decide, as before
    small = activation_bytes(m, Layout(), max_batched_tokens=8192, max_num_seqs=256)
    assert capped - small == pytest.approx((8192 - 256) * 128256 * 4)
