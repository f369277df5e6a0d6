"""MESHSERVE_NORM_FOLD=1 on the GPU (layers/norm_fold.py): batch-1 decode, no RMSNorm kernel between layers.

Greedy tokens with the switch equal those without (fp32: exactly; bf16: up to a near-tie, tests/near_tie.py),
and a folded decode gives the same bits every time it runs (the int64 sums of squares), eager and in CUDA
graphs. The kernel's own GPU tests: tests/kernels/test_triton_norm_fold.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.near_tie import assert_agree_until_near_tie

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Llama-3.1-8B: down_proj K = 14,336 (SiLU-and-mul its own kernel); Qwen3-0.6B: K = 3,072 (SiLU inside the
# producer GEMV), q/k norms in the prologue, a tied LM head
MODELS = ["llama-3.1-8b", "qwen3-0.6b"]


def _llm(model: str, dtype: str, monkeypatch, fold: bool, eager: bool = False, prefix_caching: bool = True):
    from meshserve import LLM

    monkeypatch.delenv("MESHSERVE_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS", raising=False)
    monkeypatch.setenv("MESHSERVE_NORM_FOLD", "1" if fold else "0")
    monkeypatch.setenv("MESHSERVE_NORM_GEMV", "0")  # the first layer's norm as its own kernel (counted below)
    return LLM(
        model=model,
        load_format="dummy",
        dtype=dtype,
        max_model_len=2048,
        enforce_eager=eager,
        hf_overrides={"num_hidden_layers": 3},
        gpu_memory_utilization=0.5,
        max_num_seqs=8,
        seed=0,
        enable_prefix_caching=prefix_caching,
    )


def _outputs(llm, max_tokens: int = 64) -> list:
    from meshserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    outs = []
    for n, seed in ((40, 1), (300, 2)):
        rng = random.Random(seed)
        prompt = {"prompt_token_ids": [rng.randint(0, 10000) for _ in range(n)]}
        outs.append(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0])
    return outs


def _run(model, dtype, monkeypatch, fold, eager=False, repeat=1):
    """(outputs of each repeat, fold_gemv calls) of one engine; the engine is shut down after. Repeats run without
    the prefix cache: a repeat that hits it prefills only the prompt's tail, other GEMM shapes, so its first
    token's logprobs differ in the last bits whatever the fold does."""
    from meshserve.kernels import triton_norm_fold

    calls = []
    real = triton_norm_fold.fold_gemv
    monkeypatch.setattr(triton_norm_fold, "fold_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    before = torch.cuda.memory_allocated()
    llm = _llm(model, dtype, monkeypatch, fold, eager, prefix_caching=repeat == 1)
    try:
        runs = [_outputs(llm) for _ in range(repeat)]
    finally:
        llm.shutdown()
        monkeypatch.setattr(triton_norm_fold, "fold_gemv", real)
    assert torch.cuda.memory_allocated() - before < 2**30
    return runs, len(calls)


@pytest.mark.parametrize("model", MODELS)
def test_fold_keeps_fp32_greedy_tokens(model, monkeypatch):
    (plain,), plain_calls = _run(model, "float32", monkeypatch, fold=False)
    (folded,), calls = _run(model, "float32", monkeypatch, fold=True)
    assert plain_calls == 0 and calls > 0  # the switch decides (captured into the batch-1 graph)
    for a, b in zip(plain, folded):
        # fp32: the folded GEMVs sum in another order than cuBLAS, and the norms' sums are exact fixed point
        assert b.token_ids == a.token_ids


@pytest.mark.parametrize("model", MODELS)
def test_fold_keeps_bf16_greedy_tokens_until_a_near_tie(model, monkeypatch):
    (plain,), _ = _run(model, "bfloat16", monkeypatch, fold=False)
    (folded,), calls = _run(model, "bfloat16", monkeypatch, fold=True)
    assert calls > 0
    for a, b in zip(plain, folded):
        assert_agree_until_near_tie(a, b)


@pytest.mark.parametrize("eager", [False, True])
def test_folded_decode_repeats_bit_for_bit(eager, monkeypatch):
    # the sums are int64: whichever program's atomic lands first, the same norms, the same logprobs, every run
    runs, calls = _run("llama-3.1-8b", "bfloat16", monkeypatch, fold=True, eager=eager, repeat=3)
    assert calls > 0
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert b.token_ids == a.token_ids
            assert [{t: p.logprob for t, p in s.items()} for s in b.logprobs] == [
                {t: p.logprob for t, p in s.items()} for s in a.logprobs
            ]


def test_fold_removes_the_norm_kernels_of_batch_1_decode(monkeypatch):
    """Eager, profiled: per batch-1 decode step of L layers the fold leaves 2 of the 2L + 1 RMSNorm kernels
    (the first layer's, whose input is the embedding, and the final norm) and runs 4L - 1 fold GEMVs (each
    layer's four projections but the first layer's QKV)."""
    from torch.profiler import ProfilerActivity, profile

    from meshserve import SamplingParams

    layers, new_tokens = 3, 8
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    counts = {}
    before = torch.cuda.memory_allocated()
    for fold in (False, True):
        llm = _llm("llama-3.1-8b", "bfloat16", monkeypatch, fold, eager=True)
        try:
            llm.generate([{"prompt_token_ids": list(range(100, 132))}], params, use_tqdm=False)  # warm
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                llm.generate([{"prompt_token_ids": list(range(200, 232))}], params, use_tqdm=False)
                torch.cuda.synchronize()
        finally:
            llm.shutdown()
        names = {e.key: e.count for e in prof.key_averages() if e.device_time_total > 0}
        counts[fold] = (
            sum(n for k, n in names.items() if "rms_norm" in k),
            sum(n for k, n in names.items() if "fold_gemv" in k),
        )
    assert torch.cuda.memory_allocated() - before < 2**30
    decode_steps = new_tokens - 1  # the prefill (32 rows) gives the first token and keeps every norm
    (norms_off, folds_off), (norms_on, folds_on) = counts[False], counts[True]
    assert folds_off == 0 and folds_on == decode_steps * (4 * layers - 1), counts
    assert norms_off - norms_on == decode_steps * (2 * layers - 1), counts
