"""MESHSERVE_DECODE_FUSED_PROLOGUE=1 on the GPU (kernels/triton_decode_fused.py): decode-only steps run the q/k
norm, rotary and K/V write inside the decode attention launch.

Greedy tokens with the switch equal those without (fp32; bf16 and an fp8 cache up to a near-tie,
tests/near_tie.py: the interpreter gives the two paths' outputs and cache bytes bit for bit, so a bf16 divergence
on the GPU is the compiled code's rounding choices at a near-tie), in CUDA graphs and eager, at batch 1 over contexts crossing the short graphs' bounds (256:
one KV split -> four at batch 1, so the current token is in a later split than the first; 1,024: the
max_model_len graphs) and in a batch with a CUDA-graph padding row. A wrong writer split, a missing barrier
between the K/V write and its read-back, or a race with the previous kernel (PDL) shows here as changed tokens.
The kernel's interpreter tests: tests/kernels/test_triton_decode_fused.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.near_tie import assert_agree_until_near_tie

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Qwen3-0.6B: q/k norms, 16 q / 8 KV heads; Llama-3.1-8B: no norms, 32 q / 8 KV heads
MODELS = ["qwen3-0.6b", "llama-3.1-8b"]
# batch 1, one prompt at a time: contexts 40 -> 104, 220 -> 284 (crosses 256), 1,000 -> 1,064 (crosses 1,024)
PROMPTS = [(40, 1), (220, 2), (1000, 3)]


def _llm(model: str, dtype: str, monkeypatch, fused: bool, eager: bool = False, **kwargs):
    from meshserve import LLM

    monkeypatch.delenv("MESHSERVE_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS", raising=False)
    monkeypatch.setenv("MESHSERVE_DECODE_FUSED_PROLOGUE", fused if isinstance(fused, str) else "1" if fused else "0")
    monkeypatch.setenv("MESHSERVE_DECODE_CONTEXT_BOUNDS", "256,1024")  # the short graphs for every model
    llm = LLM(
        model=model,
        load_format="dummy",
        dtype=dtype,
        max_model_len=2048,
        enforce_eager=eager,
        hf_overrides={"num_hidden_layers": 3},
        gpu_memory_utilization=0.5,
        max_num_seqs=8,
        seed=0,
        enable_prefix_caching=False,  # every prompt prefilled whole, both runs alike
        **kwargs,
    )
    assert llm.engine.runner.kernels.decode_fused_prologue == bool(fused)
    return llm


def _prompt(n: int, seed: int) -> dict:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randint(0, 10000) for _ in range(n)]}


def _run(model, dtype, monkeypatch, fused, eager=False, batched=False, max_tokens=64, **kwargs):
    """(outputs, fused launches) of one engine: the prompts one at a time (batch 1), or all together (batch 3:
    a graph of 4 rows with one padding row); the engine is shut down after."""
    from meshserve import SamplingParams
    from meshserve.kernels import triton_decode_fused

    calls = []
    real = triton_decode_fused.decode_attention_fused
    monkeypatch.setattr(triton_decode_fused, "decode_attention_fused",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    # top 5: random bf16 weights give flat logits where a divergence can be a three-way near-tie (Llama-3.1-8B,
    # step 29: plain's runner-up ranked third in the other run, out of a top 2); near_tie's gap bounds still apply
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    before = torch.cuda.memory_allocated()
    llm = _llm(model, dtype, monkeypatch, fused, eager, **kwargs)
    try:
        prompts = [_prompt(n, s) for n, s in PROMPTS]
        if batched:
            outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        else:
            outs = [llm.generate([p], params, use_tqdm=False)[0].outputs[0] for p in prompts]
    finally:
        llm.shutdown()
        monkeypatch.setattr(triton_decode_fused, "decode_attention_fused", real)
    assert torch.cuda.memory_allocated() - before < 2**30
    return outs, len(calls)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("eager", [False, True])
def test_fused_prologue_keeps_fp32_greedy_tokens(model, eager, monkeypatch):
    plain, plain_calls = _run(model, "float32", monkeypatch, fused=False, eager=eager)
    fused, calls = _run(model, "float32", monkeypatch, fused=True, eager=eager)
    assert plain_calls == 0 and calls > 0  # the switch decides (captured into the decode graphs)
    for a, b in zip(plain, fused):
        # the same K/V bytes; q's per-head variance may sum in another order than the prologue kernel's
        assert b.token_ids == a.token_ids


@pytest.mark.parametrize("model", MODELS)
def test_fused_prologue_keeps_fp32_greedy_tokens_batched(model, monkeypatch):
    plain, _ = _run(model, "float32", monkeypatch, fused=False, batched=True)
    fused, calls = _run(model, "float32", monkeypatch, fused=True, batched=True)
    assert calls > 0
    for a, b in zip(plain, fused):
        assert b.token_ids == a.token_ids


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_fused_prologue_keeps_bf16_greedy_tokens_until_a_near_tie(model, kv_cache_dtype, monkeypatch):
    plain, _ = _run(model, "bfloat16", monkeypatch, fused=False, kv_cache_dtype=kv_cache_dtype)
    fused, calls = _run(model, "bfloat16", monkeypatch, fused=True, kv_cache_dtype=kv_cache_dtype)
    assert calls > 0
    for a, b in zip(plain, fused):
        assert_agree_until_near_tie(a, b)


@pytest.mark.parametrize("model", MODELS)
def test_split_rule_keeps_fp32_greedy_tokens(model, monkeypatch):
    """MESHSERVE_DECODE_FUSED_PROLOGUE=split: only launches with KV splits fuse (batch 1 past the 256 bound here),
    so fewer forwards go through the fused launch than with =1 (the one-split graphs of contexts <= 256 keep the
    two-step path), and the tokens are the plain path's."""
    plain, _ = _run(model, "float32", monkeypatch, fused=False)
    _, all_calls = _run(model, "float32", monkeypatch, fused=True)
    split, split_calls = _run(model, "float32", monkeypatch, fused="split")
    assert 0 < split_calls < all_calls
    for a, b in zip(plain, split):
        assert b.token_ids == a.token_ids
