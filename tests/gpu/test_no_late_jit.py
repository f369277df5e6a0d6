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
    [("llama", {}), ("llama", {"kv_cache_dtype": "fp8"}), ("llama", {"quantization": "fp8"}), ("qwen3_moe", {}),
     ("deepseek_v2", {})],
    ids=["llama", "llama-fp8kv", "llama-fp8", "qwen3_moe", "deepseek_v2"],
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


# issue 29: a W2-like mix of long prompts. Past max_num_batched_tokens their later chunks sit behind cached
# tokens; past the MLA prefill workspace (8192 context rows) the context is attended in pieces and merged
# (17000: three pieces); the MoE's grouped GEMM meets every tile config and odd pair counts.
LONG_PROMPT_LENGTHS = (600, 1500, 9000, 17000)
PREFIX_TAILS = (12, 30, 50, 100, 700)  # new tokens behind a 16000-token prefix hit: each MLA query tile


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen3_moe"])
def test_no_triton_compile_in_a_w2_like_mix_of_long_prompts(family, tmp_path_factory, monkeypatch):
    from meshserve import LLM, SamplingParams
    from tests.conftest import VOCAB, make_tiny_checkpoint
    from tests.gpu.jit_builds import TritonBuilds

    monkeypatch.delenv("MESHSERVE_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS", raising=False)
    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp(f"long-{family}")), family,
                                max_position_embeddings=32768)
    llm = LLM(model=path, dtype="bfloat16", device="cuda", max_model_len=20000, max_num_seqs=32,
              max_num_batched_tokens=512, enable_prefix_caching=True, seed=0)
    rng = random.Random(0)

    def ids(n):
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    try:
        with TritonBuilds() as builds:
            # W2's shape: prompts of 100-1024 tokens and 5-60 new ones (decode batches shrink as they finish),
            # beside the long prompts
            lengths = [rng.randint(100, 1024) for _ in range(24)] + list(LONG_PROMPT_LENGTHS)
            prompts = [{"prompt_token_ids": ids(n)} for n in lengths]
            params = [SamplingParams(temperature=0.6, max_tokens=rng.randint(5, 60), ignore_eos=True)
                      for _ in prompts]
            outs = llm.generate(prompts, params, use_tqdm=False)
            assert all(o.outputs[0].token_ids for o in outs)
            # prefix hits on the longest prompt: one tail at a time (each its longest query), then together
            prefix = prompts[-1]["prompt_token_ids"][:16000]
            tails = [{"prompt_token_ids": prefix + ids(n)} for n in PREFIX_TAILS]
            greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
            for tail in tails:
                assert llm.generate([tail], greedy, use_tqdm=False)[0].outputs[0].token_ids
            assert len(llm.generate(tails, greedy, use_tqdm=False)) == len(tails)
        assert not builds.entries, f"{len(builds.entries)} Triton builds after start-up:\n{builds.report()}"
    finally:
        llm.shutdown()


def test_no_triton_compile_for_prompts_past_the_long_prefill_tile(tmp_path_factory, monkeypatch):
    """Issue 29: a prompt step whose chunk has LONG_PREFILL_TOKENS or more takes the long-prefill attention tile
    (eager: past the mixed-step graphs); the prefill warm-up builds it, not a user's first long prompt (seen in
    the H200 disaggregation runs: 2-8k-token prompts)."""
    from meshserve import LLM, SamplingParams
    from meshserve.kernels.attention_tile_config import LONG_PREFILL_TOKENS
    from tests.conftest import VOCAB, make_tiny_checkpoint
    from tests.gpu.jit_builds import TritonBuilds

    monkeypatch.delenv("MESHSERVE_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS", raising=False)
    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("long-llama")), "llama", max_position_embeddings=8192)
    llm = LLM(model=path, dtype="bfloat16", device="cuda", max_model_len=8192, max_num_seqs=8,
              max_num_batched_tokens=2048, enable_prefix_caching=True, seed=0)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    try:
        with TritonBuilds() as builds:
            # alone (one eager prompt step each), the longest in chunks behind its cached first chunk
            for n in (LONG_PREFILL_TOKENS, 1900, 5000):
                prompt = {"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(n)]}
                assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        assert not builds.entries, f"{len(builds.entries)} Triton builds after start-up:\n{builds.report()}"
    finally:
        llm.shutdown()


@pytest.mark.parametrize("extra", [{}, {"kv_cache_dtype": "fp8"}], ids=["bf16", "fp8kv"])
def test_no_triton_compile_in_large_decode_batches(extra, tiny_model_dir, monkeypatch):
    """Decode batches past two waves of (sequence, KV head) programs take the balanced decode kernel
    (kernels/triton_decode_balanced.py, the default on Hopper) beside mixed steps whose decode rows grow with the
    batch: the eager warm-up's one step at the smallest routed batch and the graph captures build all of it."""
    from meshserve import LLM, SamplingParams
    from meshserve.kernels.triton_attention import GRID_TILE_MIN_WAVES, _num_sms
    from tests.conftest import VOCAB
    from tests.gpu.jit_builds import TritonBuilds

    monkeypatch.delenv("MESHSERVE_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS", raising=False)
    monkeypatch.delenv("MESHSERVE_DECODE_BALANCED", raising=False)
    llm = LLM(model=tiny_model_dir("llama"), dtype="bfloat16", device="cuda", max_model_len=256, max_num_seqs=256,
              max_num_batched_tokens=512, enable_prefix_caching=False, seed=0, **extra)
    try:
        layer = llm.engine.runner.model.model.layers[0].self_attn.attn
        routed = -(-GRID_TILE_MIN_WAVES * _num_sms(0) // layer.num_kv_heads)  # the smallest balanced batch
        assert llm.engine.runner.kernels.decode_balanced and routed < 256
        rng = random.Random(1)
        # staggered lengths: the batch grows through mixed steps and shrinks through decode-only ones
        prompts = [{"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 60))]}
                   for _ in range(250)]
        params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 40), ignore_eos=True) for _ in prompts]
        with TritonBuilds() as builds:
            outs = llm.generate(prompts, params, use_tqdm=False)
        assert len(outs) == 250
        assert not builds.entries, f"{len(builds.entries)} Triton builds after start-up:\n{builds.report()}"
    finally:
        llm.shutdown()
