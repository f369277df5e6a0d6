"""Speculative decoding under async scheduling on the GPU, in fp32 (Triton attention, decode and mixed-step
graphs): greedy tokens equal with async scheduling on and off and without speculation, with replayed
proposals (long accepted runs and rejections), chunked prefill and requests finishing mid-step; verify steps
run behind verify steps in flight (the runner moves them back by the rejected count on the device)."""

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
        max_num_batched_tokens=256,
        seed=0,
        **kw,
    )


@pytest.mark.parametrize("error_rate", [0.0, 0.3])
def test_gpu_greedy_equal_async_on_and_off(error_rate):
    from meshserve import SamplingParams
    from meshserve.spec_decode.replay_proposer import ReplayProposer

    rng = random.Random(0)
    prompts = [
        {"prompt_token_ids": [rng.randint(0, 10000) for _ in range(rng.randint(5, 600))]} for _ in range(6)
    ]
    params = [SamplingParams(temperature=0, max_tokens=16 + 8 * i, ignore_eos=True) for i in range(6)]
    ref = _llm()
    expected = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    ref.shutdown()
    references = {tuple(p["prompt_token_ids"]): e for p, e in zip(prompts, expected)}
    for mode in (False, True):
        llm = _llm(async_scheduling=mode, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
        core = llm.engine.core
        assert core.scheduler.verify_ahead is mode
        core.speculator.proposer = ReplayProposer(references, 4, error_rate, 151936)
        behind = []
        launch = core.executor.execute_async

        def spy(sched_out, launch=launch, behind=behind):
            behind.extend(e.num_unverified_tokens for e in sched_out.scheduled if e.num_spec_tokens)
            return launch(sched_out)

        core.executor.execute_async = spy
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
        assert core.speculator.stats.num_accepted_tokens > 0
        if mode:
            assert sum(n > 0 for n in behind) > 0
        bm = core.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        llm.shutdown()
