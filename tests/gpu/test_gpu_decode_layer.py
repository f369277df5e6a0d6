"""MESHSERVE_DECODE_LAYER on the GPU (layers/decode_layer.py): each decoder layer of a batch-1 decode step in one
persistent launch with grid barriers between its phases (dense layers, and MoE layers with softmax top-k routing).

Greedy tokens with the switch equal those without (fp32: exactly; bf16: up to a near-tie, tests/near_tie.py),
eager and in CUDA graphs, in one launch a layer and in one launch a phase (the same programs: the same bits);
the kernel runs (counted) and nothing hangs. The kernel's own GPU tests: tests/kernels/test_triton_decode_layer.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.near_tie import assert_agree_until_near_tie

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(model: str, dtype: str, monkeypatch, switch: str, eager: bool = False, kv_cache_dtype: str = "auto",
         quantization: str | None = None):
    """(outputs, decode_layer calls) of one engine over two prompts; the engine is shut down after."""
    from meshserve import LLM, SamplingParams
    from meshserve.kernels import triton_decode_layer

    monkeypatch.delenv("MESHSERVE_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS", raising=False)
    monkeypatch.setenv("MESHSERVE_DECODE_LAYER", switch)
    calls = []
    real = triton_decode_layer.decode_layer
    monkeypatch.setattr(triton_decode_layer, "decode_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    llm = LLM(model=model, load_format="dummy", dtype=dtype, max_model_len=4096, enforce_eager=eager,
              hf_overrides={"num_hidden_layers": 3}, gpu_memory_utilization=0.5, max_num_seqs=8, seed=0,
              kv_cache_dtype=kv_cache_dtype, quantization=quantization)
    try:
        # top 5: dummy weights give flat distributions, where a flip is often among three near-tied tokens
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=5)
        outs = []
        for n, seed in ((40, 1), (1500, 2)):  # one attention tile, then twelve
            rng = random.Random(seed)
            prompt = {"prompt_token_ids": [rng.randint(0, 10000) for _ in range(n)]}
            outs.append(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0])
    finally:
        llm.shutdown()
        monkeypatch.setattr(triton_decode_layer, "decode_layer", real)
    return outs, len(calls)


@pytest.mark.parametrize("switch", ["1", "phases", "1:2,8"])
def test_decode_layer_keeps_fp32_greedy_tokens(switch, monkeypatch):
    plain, plain_calls = _run("qwen3-0.6b", "float32", monkeypatch, "0")
    fused, calls = _run("qwen3-0.6b", "float32", monkeypatch, switch)
    assert plain_calls == 0 and calls > 0
    for a, b in zip(plain, fused):
        assert b.token_ids == a.token_ids


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("model", ["qwen3-0.6b", "llama-3.1-8b"])
def test_decode_layer_keeps_bf16_greedy_tokens_until_a_near_tie(model, eager, monkeypatch):
    plain, _ = _run(model, "bfloat16", monkeypatch, "0", eager)
    fused, calls = _run(model, "bfloat16", monkeypatch, "1", eager)
    assert calls > 0
    for a, b in zip(plain, fused):
        assert_agree_until_near_tie(a, b)


def test_decode_layer_over_an_fp8_cache_keeps_greedy_tokens_until_a_near_tie(monkeypatch):
    plain, _ = _run("qwen3-0.6b", "bfloat16", monkeypatch, "0", kv_cache_dtype="fp8")
    fused, calls = _run("qwen3-0.6b", "bfloat16", monkeypatch, "1", kv_cache_dtype="fp8")
    assert calls > 0
    for a, b in zip(plain, fused):
        assert_agree_until_near_tie(a, b)


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen3-0.6b"])
@pytest.mark.parametrize("quantization", ["fp8", "awq"])
def test_decode_layer_with_quantized_weights_keeps_greedy_tokens_until_a_near_tie(model, quantization, monkeypatch):
    """`--quantization fp8` (e4m3 weights, a scale a row) and `awq` (dummy weights quantized to INT4 in groups of
    128): the kernel's words / INT4 paths against the plain path's GEMVs, all weight-only at batch 1."""
    plain, _ = _run(model, "bfloat16", monkeypatch, "0", quantization=quantization)
    fused, calls = _run(model, "bfloat16", monkeypatch, "1", quantization=quantization)
    assert calls > 0
    for a, b in zip(plain, fused):
        assert_agree_until_near_tie(a, b)


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_decode_layer_moe_keeps_fp32_greedy_tokens(model, monkeypatch):
    """Sparse layers: the router's phase, the routing in every program, the chosen experts' rows. In fp32, where
    the summation order moves the router's logits by far less than a tie between two experts."""
    plain, _ = _run(model, "float32", monkeypatch, "0")
    fused, calls = _run(model, "float32", monkeypatch, "1")
    assert calls > 0
    for a, b in zip(plain, fused):
        assert b.token_ids == a.token_ids


def test_decode_layer_moe_keeps_bf16_greedy_tokens_until_a_near_tie(monkeypatch):
    """In bf16 on Qwen3-30B-A3B (eight of 128 experts). Not on Mixtral's two of eight: with random routers two
    experts tie often, a flipped expert carries up to half of the MLP's output, and the logprobs move
    by more than a near-tie's tolerance before any token differs (seen on the device, 2026-12-05)."""
    plain, _ = _run("qwen3-30b-a3b", "bfloat16", monkeypatch, "0")
    fused, calls = _run("qwen3-30b-a3b", "bfloat16", monkeypatch, "1")
    assert calls > 0
    for a, b in zip(plain, fused):
        assert_agree_until_near_tie(a, b)
