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
    from tests.gpu.test_gpu_spec_decode import _llm as spec_llm

    # the spec-decode tests' tiny engine, with a small token budget: prompts take several chunked steps
    return spec_llm(max_num_batched_tokens=256, **kw)


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
