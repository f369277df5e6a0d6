"""Speculative decoding under tensor parallelism (2 ranks on gloo): the draft model runs sharded on both
ranks, TP rank 0 verifies and broadcasts the step's tokens; greedy output equals one device's without it."""

from __future__ import annotations

import random

from meshserve import LLM, SamplingParams
from tests.conftest import VOCAB


def test_tp2_draft_model_greedy_and_sampled(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    rng = random.Random(2)
    prompts = [{"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(n)]} for n in (7, 20, 13)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    single = LLM(model=path, block_size=4)
    expected = [o.outputs[0].token_ids for o in single.generate(prompts, greedy, use_tqdm=False)]
    single.shutdown()
    llm = LLM(
        model=path,
        block_size=4,
        tensor_parallel_size=2,
        num_gpu_blocks_override=24,
        speculative_config={"method": "draft_model", "model": path, "num_speculative_tokens": 3},
    )
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == expected
        stats = llm.engine.stats()
        assert (
            stats["spec_num_accepted_tokens"] >= 0.95 * stats["spec_num_draft_tokens"] > 0
        )  # draft == target
        sampled = llm.generate(
            prompts, SamplingParams(temperature=1.0, max_tokens=12, seed=3, ignore_eos=True), use_tqdm=False
        )
        assert all(len(o.outputs[0].token_ids) == 12 for o in sampled)
    finally:
        llm.shutdown()
