"""DeepSeek (MLA + grouped routing + shared experts) on two gloo ranks: attention heads split over TP with the
latent replicated, experts TP-split or expert-parallel; greedy tokens equal one device's, which are HF's, under
chunked prefill, prefix-cache hits and preemption."""

from __future__ import annotations

import pytest

from tests.distributed.test_expert_parallel import _generate, _prompts, _single


@pytest.mark.parametrize("family,ep", [
    ("deepseek_v3", False),  # MLA heads split, latent replicated: new here
    pytest.param("deepseek_v3", True, marks=pytest.mark.slow),  # EP itself: tests/distributed/test_expert_parallel
    pytest.param("deepseek_v2", False, marks=pytest.mark.slow),
], ids=["v3-tp2", "v3-ep2", "v2-tp2"])
def test_two_ranks_match_one_device_and_hf(family, ep, tiny_model_dir, hf_model):
    single = _single(family, tiny_model_dir, hf_model)
    got, stats, load = _generate(tiny_model_dir(family), _prompts(), tensor_parallel_size=2,
                                 enable_expert_parallel=ep, max_num_batched_tokens=16, block_size=4,
                                 num_gpu_blocks_override=12)
    assert got == single
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert len(load) == 2 and load[0] == load[1] and all(sum(layer) > 0 for layer in load[0])


@pytest.mark.parametrize("family", ["deepseek_v2", pytest.param("deepseek_v3", marks=pytest.mark.slow)])
def test_two_ranks_with_the_shared_experts_folded_match_one_device(family, tiny_model_dir, hf_model,
                                                                    monkeypatch):
    """MESHSERVE_MOE_FUSE_SHARED=1 at TP 2: each rank's slice of the shared MLP (S x I/2 units) rides in its
    routed experts' launches as S experts of width I/2, its partial sums in the MoE layer's one all-reduce:
    one device's (HF's) greedy tokens."""
    single = _single(family, tiny_model_dir, hf_model)
    monkeypatch.setenv("MESHSERVE_MOE_FUSE_SHARED", "1")
    got, stats, _ = _generate(tiny_model_dir(family), _prompts(), tensor_parallel_size=2,
                              max_num_batched_tokens=16, block_size=4, num_gpu_blocks_override=12)
    assert got == single
    assert stats["num_preemptions"] > 0
