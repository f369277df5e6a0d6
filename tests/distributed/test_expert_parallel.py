"""MoE models on two gloo ranks: TP (each expert split) and EP (experts spread, all-to-all) give one device's
greedy tokens, which are HF's, under chunked prefill, prefix-cache hits and preemption."""

from __future__ import annotations

import random

import pytest

from meshserve import LLM, SamplingParams
from tests.conftest import VOCAB

MAX_NEW = 8


def _prompts() -> list[list[int]]:
    rng = random.Random(11)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 19, 33, 12)]
    # the last two share a 16-token prefix: prefix-cache hits under every layout
    return prompts + [prompts[1][:16] + [7, 8, 9], prompts[1][:16] + [10, 11]]


def _generate(path: str, prompts, **kw):
    llm = LLM(model=path, **kw)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        load = llm.engine.executor.gather_rpc("expert_load")
        return [o.outputs[0].token_ids for o in outs], llm.engine.stats(), load
    finally:
        llm.shutdown()


_SINGLE: dict[str, list] = {}


def _single(family, tiny_model_dir, hf_model):
    if family not in _SINGLE:
        from tests.engine.test_engine_vs_hf import hf_greedy

        path = tiny_model_dir(family)
        prompts = _prompts()
        tokens, _, _ = _generate(path, prompts)
        assert tokens == [hf_greedy(hf_model(path), p, MAX_NEW) for p in prompts]
        _SINGLE[family] = tokens
    return _SINGLE[family]


@pytest.mark.parametrize("family,ep", [
    ("qwen3_moe", True),
    pytest.param("qwen3_moe", False, marks=pytest.mark.slow),  # TP-split experts: also in tests/layers
    pytest.param("mixtral", True, marks=pytest.mark.slow),
    pytest.param("mixtral", False, marks=pytest.mark.slow),
    pytest.param("qwen2_moe", True, marks=pytest.mark.slow),  # a shared expert beside the routed ones
], ids=["qwen3moe-ep2", "qwen3moe-tp2", "mixtral-ep2", "mixtral-tp2", "qwen2moe-ep2"])
def test_two_ranks_match_one_device_and_hf(family, ep, tiny_model_dir, hf_model):
    single = _single(family, tiny_model_dir, hf_model)
    # chunked prefill (budget 16) and preemption (12 blocks of 4) in the same run
    got, stats, load = _generate(tiny_model_dir(family), _prompts(), tensor_parallel_size=2,
                                 enable_expert_parallel=ep, max_num_batched_tokens=16, block_size=4,
                                 num_gpu_blocks_override=12)
    assert got == single
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    # per-layer expert counts, the same on both ranks (every rank routes the whole batch)
    assert len(load) == 2 and load[0] == load[1] and len(load[0]) > 0
    assert all(sum(layer) > 0 for layer in load[0])


@pytest.mark.slow
def test_dummy_weights_under_expert_parallel_are_one_devices(tiny_model_dir):
    """Dummy weights are drawn as transformers 5's stacked expert tensors and sharded like a checkpoint."""
    path = tiny_model_dir("mixtral")
    single, _, _ = _generate(path, _prompts()[:2], load_format="dummy", seed=3)
    ep, _, _ = _generate(path, _prompts()[:2], load_format="dummy", seed=3, tensor_parallel_size=2,
                         enable_expert_parallel=True)
    assert ep == single


@pytest.mark.slow
def test_pipeline_stages_split_sparse_and_dense_layers(tiny_model_dir, hf_model):
    """Qwen3-MoE with PP = 2: stage 0 holds the sparse layer, stage 1 the dense one (mlp_only_layers)."""
    single = _single("qwen3_moe", tiny_model_dir, hf_model)
    got, _, load = _generate(tiny_model_dir("qwen3_moe"), _prompts(), pipeline_parallel_size=2)
    assert got == single
    assert len(load[0]) == 1 and load[1] == []  # each stage counts its own MoE layers
