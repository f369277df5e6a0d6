"""EAGLE-3 on the GPU: the target's hidden states are captured inside its CUDA graphs (decode and mixed-step),
and greedy tokens with a random head equal those without speculation, graphs on and eager."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LAYERS = 8  # vLLM's default layers (2, 4, 5) exist


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> str:
    from meshserve.models.loader import resolve_model_source
    from meshserve.spec_decode.eagle3_random_head import head_config, random_head_tensors, write_head

    cfg = resolve_model_source("qwen3-0.6b", load_format="dummy").hf_config
    cfg.num_hidden_layers = LAYERS
    path = str(tmp_path_factory.mktemp("eagle3-head"))
    return write_head(path, head_config(cfg, 4096), random_head_tensors(cfg, 4096))


def _llm(**kw):
    from meshserve import LLM

    return LLM(
        model="qwen3-0.6b",
        load_format="dummy",
        dtype="float32",
        max_model_len=1024,
        hf_overrides={"num_hidden_layers": LAYERS},
        gpu_memory_utilization=0.4,
        max_num_seqs=16,
        seed=0,
        **kw,
    )


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_gpu_eagle3_greedy_equal(head, enforce_eager):
    from meshserve import SamplingParams

    rng = random.Random(0)
    prompts = [
        {"prompt_token_ids": [rng.randint(0, 10000) for _ in range(rng.randint(5, 300))]} for _ in range(6)
    ]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    ref = _llm(enforce_eager=enforce_eager)
    expected = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    ref.shutdown()
    spec = {"method": "eagle3", "model": head, "num_speculative_tokens": 3}
    llm = _llm(enforce_eager=enforce_eager, speculative_config=spec)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    # batch 1 too (the decode graphs of one sequence, the GEMV path of the head)
    one = llm.generate(prompts[:1], params, use_tqdm=False)[0].outputs[0].token_ids
    assert one == expected[0]
    assert llm.engine.core.speculator.stats.num_draft_tokens > 0
    llm.shutdown()
