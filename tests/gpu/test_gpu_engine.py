"""On the GPU, the fast path (Triton attention + CUDA graphs) gives the eager torch reference's outputs."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODELS = ["qwen3-0.6b", "llama-3.1-8b"]


def _llm(model: str, dtype: str, backend: str, eager: bool, monkeypatch, **engine_kwargs):
    from meshserve import LLM

    monkeypatch.setenv("MESHSERVE_ATTENTION_BACKEND", backend)
    # the reference is the plain torch path throughout: no fused Triton ops either
    if backend == "torch":
        monkeypatch.setenv("MESHSERVE_DISABLE_FUSED_OPS", "1")
    else:
        monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS", raising=False)
    return LLM(model=model, load_format="dummy", dtype=dtype, max_model_len=1024, enforce_eager=eager,
               hf_overrides={"num_hidden_layers": 3}, gpu_memory_utilization=0.5, seed=0,
               **{"max_num_seqs": 32, **engine_kwargs})


def _prompts(n: int = 6) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randint(0, 10000) for _ in range(rng.randint(5, 300))]} for _ in range(n)]


@pytest.mark.parametrize("model", MODELS)
def test_fast_path_greedy_tokens_equal_reference_fp32(model, monkeypatch):
    from meshserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = _llm(model, "float32", "torch", True, monkeypatch)
    expected = [o.outputs[0].token_ids for o in ref.generate(_prompts(), params, use_tqdm=False)]
    ref.shutdown()
    fast = _llm(model, "float32", "triton", False, monkeypatch)
    assert fast.engine.runner.graphs is not None
    got = [o.outputs[0].token_ids for o in fast.generate(_prompts(), params, use_tqdm=False)]
    fast.shutdown()
    assert got == expected


@pytest.mark.parametrize("model", MODELS)
def test_balanced_decode_greedy_tokens_equal_reference_fp32(model, monkeypatch):
    """MESHSERVE_DECODE_BALANCED (kernels/triton_decode_balanced.py) in the engine, CUDA graphs and all: 40
    sequences x 8 KV heads pass the grid-size rule (2 programs an SM of an H200: 33), so decode steps of the
    full batch take it, and the later ones (sequences finishing) the split kernel."""
    from meshserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = _llm(model, "float32", "torch", True, monkeypatch, max_num_seqs=64)
    expected = [o.outputs[0].token_ids for o in ref.generate(_prompts(40), params, use_tqdm=False)]
    ref.shutdown()
    monkeypatch.setenv("MESHSERVE_DECODE_BALANCED", "4")
    fast = _llm(model, "float32", "triton", False, monkeypatch, max_num_seqs=64)
    assert fast.engine.runner.kernels.decode_balanced == 4
    got = [o.outputs[0].token_ids for o in fast.generate(_prompts(40), params, use_tqdm=False)]
    fast.shutdown()
    assert got == expected


@pytest.mark.parametrize("model", MODELS)
def test_fast_path_bf16_logprobs_within_tolerance(model, monkeypatch):
    # bf16 activations through 3 random layers: the fused kernels round differently from the torch path,
    # moving logprobs near -13 (H200, 2026-12-04, 624 positions: Llama-3.1-8B mean 0.016, max 0.063; Qwen3-0.6B
    # 0.005, 0.021); a wrong kernel moves them by whole units
    _assert_fast_logprobs_near_reference(model, monkeypatch, 0.15, mean_tol=0.04)


# (engine kwargs, max, mean): the fp8 formats carry the bf16 rounding differences above into e4m3 roundings one
# step (6%) apart. Measured on an H200 (2026-12-04, 624 positions): fp8 KV mean 0.027 / max 0.11 on Llama-3.1-8B,
# 0.008 / 0.04 on Qwen3-0.6B; fp8 weights + KV (dynamic per-token activation scales) 0.128 / 0.54 and 0.042 /
# 0.17, both 7.9x the model's bf16 mean: the same amplification on both, not one model's kernel going wrong. The
# bounds are about twice the larger model's; a missing or wrong scale moves the mean by units.
FP8_CASES = [({"kv_cache_dtype": "fp8"}, 0.3, 0.08),
             ({"quantization": "fp8", "kv_cache_dtype": "fp8"}, 1.0, 0.3)]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("quant, tol, mean_tol", FP8_CASES, ids=["fp8kv", "fp8w-fp8kv"])
def test_fast_path_fp8_logprobs_within_tolerance(model, quant, tol, mean_tol, monkeypatch):
    """fp8 KV (fused prologue writing e4m3, fp16-dot decode tiles) and fp8 weights (Triton activation
    quantization + _scaled_mm) against the torch reference of the same formats."""
    _assert_fast_logprobs_near_reference(model, monkeypatch, tol, mean_tol=mean_tol, **quant)


@pytest.mark.parametrize("model", MODELS)
def test_triton_fp8_gemm_logprobs_within_tolerance(model, monkeypatch):
    """MESHSERVE_FP8_GEMM=triton (kernels/triton_decode_gemm.py) for the fast engine's multi-row fp8 projections,
    against the reference on _scaled_mm: the fp8 weights' bounds (the GEMMs differ only in summation order)."""
    _assert_fast_logprobs_near_reference(model, monkeypatch, 1.0, 0.3, fast_env={"MESHSERVE_FP8_GEMM": "triton"},
                                         quantization="fp8")


@pytest.mark.parametrize("model", MODELS)
def test_triton_decode_gemm_logprobs_within_tolerance(model, monkeypatch):
    """MESHSERVE_DECODE_GEMM=1 (kernels/triton_decode_gemm.py, under PDL on Qwen3-0.6B) for the fast engine's
    16-bit projections and LM head of 2-512 rows: the bf16 bounds."""
    _assert_fast_logprobs_near_reference(model, monkeypatch, 0.15, 0.04, fast_env={"MESHSERVE_DECODE_GEMM": "1"})


def _assert_fast_logprobs_near_reference(model, monkeypatch, tol, mean_tol, fast_env=None, **engine_kwargs):
    """The fast path's prompt logprobs and first sampled best logprob within `tol` of the torch reference's
    everywhere, and within `mean_tol` on average (a kernel off by a little everywhere fails the mean). fast_env:
    switches set for the fast engine only."""
    from meshserve import SamplingParams

    # prompt logprobs exercise prefill; sample logprobs of forced continuations exercise graph decode
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=1, logprobs=1)
    ref = _llm(model, "bfloat16", "torch", True, monkeypatch, **engine_kwargs)
    ref_out = ref.generate(_prompts(3), params, use_tqdm=False)
    ref.shutdown()
    for name, value in (fast_env or {}).items():
        monkeypatch.setenv(name, value)
    fast = _llm(model, "bfloat16", "triton", False, monkeypatch, **engine_kwargs)
    assert fast.engine.runner.kernels.fused_prologue  # fp8 caches too
    fast_out = fast.generate(_prompts(3), params, use_tqdm=False)
    fast.shutdown()
    prompt_diffs, best_diffs = [], []
    for a, b in zip(ref_out, fast_out):
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            tok = next(iter(pa))
            prompt_diffs.append(abs(pb[tok].logprob - pa[tok].logprob))
        # random weights leave near-ties at the top, so compare the best logprob, not which token won
        best_a = max(lp.logprob for lp in a.outputs[0].logprobs[0].values())
        best_b = max(lp.logprob for lp in b.outputs[0].logprobs[0].values())
        best_diffs.append(abs(best_b - best_a))
    diffs = torch.tensor(prompt_diffs + best_diffs)
    stats = (f"{model} {engine_kwargs}: |d logprob| over {len(diffs)} positions: mean {diffs.mean():.4f}, "
             f"p99 {diffs.quantile(0.99):.4f}, max {diffs.max():.4f}")
    print(stats)
    assert diffs.max() <= tol, stats
    assert diffs.mean() <= mean_tol, stats


@pytest.mark.parametrize("model", MODELS)
def test_async_scheduling_same_tokens_on_gpu(model, monkeypatch):
    """Step n+1 launched before step n's ids are read (graphs, pinned copies, ids filled on the device)
    gives the same tokens as the synchronous loop: greedy and seeded sampling, mixed lengths."""
    from meshserve import LLM, SamplingParams

    monkeypatch.delenv("MESHSERVE_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS", raising=False)
    params = [SamplingParams(temperature=0, max_tokens=10 + 7 * i, ignore_eos=True) for i in range(4)] + \
             [SamplingParams(temperature=0.8, seed=i, max_tokens=30, ignore_eos=True) for i in range(4)]
    got = {}
    for mode in (False, True):
        llm = LLM(model=model, load_format="dummy", dtype="bfloat16", max_model_len=1024,
                  hf_overrides={"num_hidden_layers": 3}, gpu_memory_utilization=0.5, max_num_seqs=32, seed=0,
                  async_scheduling=mode)
        assert llm.engine.async_scheduling is mode
        got[mode] = [o.outputs[0].token_ids for o in llm.generate(_prompts(8), params, use_tqdm=False)]
        llm.shutdown()
    assert got[True] == got[False]
