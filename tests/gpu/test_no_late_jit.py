"""No Triton kernel compiles after the engine's start-up (issue 18): the profile run, the prefill and eager-step
warm-ups, the graph captures and the sampling warm-up build every specialization a serving workload reaches.
A mixed workload (prompts of 1-300 tokens, chunked prefill beside decodes in eager mixed steps past
--max-cudagraph-tokens, a prefix-cache hit, every sampling path) runs under Triton's jit_cache_hook and must
build nothing."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT_LENGTHS = (1, 15, 17, 100, 300)


def _param_kinds():
    from meshserve import SamplingParams

    base = {"max_tokens": 10, "ignore_eos": True}
    return [
        SamplingParams(temperature=0.0, **base),
        SamplingParams(temperature=0.8, **base),
        SamplingParams(temperature=0.8, top_k=20, **base),
        SamplingParams(temperature=0.8, top_p=0.9, **base),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, **base),
        SamplingParams(temperature=0.8, min_p=0.05, **base),
        SamplingParams(
            temperature=0.8, repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.3, **base
        ),
        SamplingParams(temperature=0.8, logprobs=3, **base),
        SamplingParams(temperature=0.0, logprobs=2, prompt_logprobs=1, **base),
        SamplingParams(temperature=0.8, seed=7, **base),
        SamplingParams(temperature=0.8, logit_bias={5: 2.0}, **base),
        SamplingParams(temperature=0.8, min_tokens=6, max_tokens=10),
        SamplingParams(temperature=0.8, max_tokens=10, structured_outputs={"json_object": True}),
    ]


def _workload(llm, vocab: int) -> int:
    """Every prompt length under every sampling kind in one batch, then a prefix-cache hit, then lone requests
    (batch-1 decode). Returns the number of requests served."""
    rng = random.Random(0)
    kinds = _param_kinds()
    prompts, params = [], []
    for i, length in enumerate(PROMPT_LENGTHS * 3):
        prompts.append({"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(length)]})
        params.append(kinds[i % len(kinds)])
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(o.outputs[0].token_ids for o in outs)
    served = len(outs)
    # the 300-token prompt again behind its cached blocks, beside a new one
    again = [prompts[4], {"prompt_token_ids": prompts[4]["prompt_token_ids"][:200] + [7] * 90}]
    served += len(llm.generate(again, kinds[1], use_tqdm=False))
    for p in kinds[:3]:  # alone: batch-1 decode, the fused sampler at one row
        served += len(llm.generate([prompts[1]], p, use_tqdm=False))
    return served


@pytest.mark.parametrize(
    "family, extra",
    [("llama", {}), ("llama", {"kv_cache_dtype": "fp8"}), ("qwen3_moe", {}), ("deepseek_v2", {})],
    ids=["llama", "llama-fp8kv", "qwen3_moe", "deepseek_v2"],
)
def test_no_triton_compile_after_start_up(family, extra, tiny_model_dir, monkeypatch):
    from meshserve import LLM
    from tests.conftest import VOCAB
    from tests.gpu.jit_builds import TritonBuilds

    monkeypatch.delenv("MESHSERVE_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS", raising=False)
    llm = LLM(
        model=tiny_model_dir(family),
        dtype="bfloat16",
        device="cuda",
        max_model_len=512,
        max_num_seqs=16,
        max_num_batched_tokens=128,
        max_cudagraph_tokens=64,
        enable_prefix_caching=True,
        seed=0,
        **extra,
    )
    try:
        with TritonBuilds() as builds:
            served = _workload(llm, VOCAB)
        assert served == 15 + 2 + 3
        assert not builds.entries, f"{len(builds.entries)} Triton builds after start-up:\n{builds.report()}"
    finally:
        llm.shutdown()


def test_the_counter_sees_a_new_specialization():
    """The hook fires for a build in this process (else the test above could not fail)."""
    import triton
    import triton.language as tl

    from tests.gpu.jit_builds import TritonBuilds

    @triton.jit
    def _fill(out_ptr, n, VALUE: tl.constexpr):
        i = tl.arange(0, 16)
        tl.store(out_ptr + i, VALUE, mask=i < n)

    out = torch.zeros(16, device="cuda")
    with TritonBuilds() as builds:
        _fill[(1,)](out, 16, VALUE=3.0)
        _fill[(1,)](out, 16, VALUE=3.0)  # the same specialization: no second build
        _fill[(1,)](out, 5, VALUE=3.0)  # 5 is neither 1 nor a multiple of 16: a new one
    assert len(builds.entries) == 2 and out[:5].eq(3.0).all()
