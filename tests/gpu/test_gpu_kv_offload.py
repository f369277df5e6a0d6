"""On the GPU: KV offload (side-stream copies, pinned CPU tier, disk tier, swap) gives the tokens of no offload."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BS = 16


def _prompts(n: int, length: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randint(0, 10000) for _ in range(length)]} for _ in range(n)]


def _revisit(rounds: int = 2, eager: bool = False, **kwargs):
    """4 prompts of 20 blocks, each alone, twice over, in a pool of 48 blocks: every revisit misses the GPU."""
    from meshserve import LLM, SamplingParams

    llm = LLM(model="qwen3-0.6b", load_format="dummy", dtype="float32", max_model_len=1024, seed=0,
              hf_overrides={"num_hidden_layers": 3}, block_size=BS, num_gpu_blocks_override=48,
              enforce_eager=eager, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
            for _ in range(rounds) for p in _prompts(4, 20 * BS - 3)]
    stats = llm.engine.stats()
    llm.shutdown()
    return outs, stats


def test_offload_tiers_give_the_tokens_of_recompute(tmp_path, monkeypatch):
    from meshserve.engine.kv_offload.manager import KVOffloadManager

    # every disk run is read (a 3-layer model recomputes 300 tokens faster than the disk reads 7 MB: the
    # cost-aware restore would skip them, and this test is about the tokens restored blocks give)
    monkeypatch.setattr(KVOffloadManager, "_read_pays", lambda self, num_blocks, recompute_s: True)
    expected, base = _revisit()
    assert base["prefix_cache_hits"] == 0
    got, stats = _revisit(kv_offloading_size=1.0, kv_offloading_verify=True)
    assert got == expected
    assert stats["kv_offload_cpu_hits"] >= 4 * 19 and stats["kv_offload_restores"] > 0
    assert stats["kv_offload_link_bytes_per_s"] > 0
    block = 3 * 2 * BS * 8 * 128 * 4  # qwen3-0.6b: 8 KV heads of 128
    disk = {"kv_offloading_size": 24 * block / 2**30, "kv_offloading_disk_path": str(tmp_path),
            "kv_offloading_disk_size": 1.0, "kv_offloading_verify": True}
    got, stats = _revisit(**disk)
    assert got == expected and stats["kv_offload_disk_hits"] > 0
    got, stats = _revisit(rounds=1, **disk)  # a warm restart
    assert got == expected[:4] and stats["kv_offload_disk_hits"] == 4 * 19


@pytest.mark.parametrize("mode", ["swap", "auto"])
def test_swap_preemption_gives_the_tokens_of_recompute(mode):
    from meshserve import LLM, SamplingParams

    def run(**kwargs):
        llm = LLM(model="qwen3-0.6b", load_format="dummy", dtype="float32", max_model_len=1024, seed=0,
                  hf_overrides={"num_hidden_layers": 3}, block_size=BS, num_gpu_blocks_override=40, **kwargs)
        outs = llm.generate(_prompts(8, 100, seed=1), SamplingParams(temperature=0, max_tokens=120, ignore_eos=True),
                            use_tqdm=False)
        stats = llm.engine.stats()
        llm.shutdown()
        return [o.outputs[0].token_ids for o in outs], stats

    expected, base = run()
    assert base["num_preemptions"] > 0
    got, stats = run(kv_offloading_size=1.0, preemption_mode=mode, kv_offloading_verify=True)
    assert got == expected
    assert stats["num_preemptions"] > 0
    if mode == "swap":
        assert stats["kv_offload_swaps_in"] == stats["kv_offload_swaps_out"] == stats["num_preemptions"]
