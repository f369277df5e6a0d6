"""Speculative decoding on the GPU (Triton attention, CUDA graphs for plain decode steps, verify steps
eager): greedy tokens equal decoding without speculation, with replayed proposals."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _llm(**kw):
    from meshserve import LLM

    return LLM(
        model="qwen3-0.6b",
        load_format="dummy",
        dtype="float32",
        max_model_len=1024,
        hf_overrides={"num_hidden_layers": 3},
        gpu_memory_utilization=0.4,
        max_num_seqs=32,
        seed=0,
        **kw,
    )


def test_gpu_greedy_equal_with_replayed_proposals():
    from meshserve import SamplingParams
    from meshserve.spec_decode.replay_proposer import ReplayProposer

    rng = random.Random(0)
    prompts = [
        {"prompt_token_ids": [rng.randint(0, 10000) for _ in range(rng.randint(5, 300))]} for _ in range(6)
    ]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    ref = _llm()
    expected = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    ref.shutdown()
    llm = _llm(speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    llm.engine.core.speculator.proposer = ReplayProposer(
        {tuple(p["prompt_token_ids"]): e for p, e in zip(prompts, expected)}, 4, 0.2, 151936
    )
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    assert llm.engine.core.speculator.stats.acceptance_rate > 0.4
    llm.shutdown()
