"""Issue 29's two cuts on the GPU: the norm folded into the QKV / gate_up GEMV, short-context decode graphs.

Each is compared with its plain path in the same process setup: greedy tokens of batch-1 decodes whose
contexts cross the graph variants' bounds (256 and 1,024 tokens) must not change.
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODELS = ["llama-3.1-8b", "qwen3-0.6b"]


def _llm(
    model: str, dtype: str, monkeypatch, fold: bool = True, bounds: str | None = None, eager: bool = False
):
    from meshserve import LLM

    monkeypatch.delenv("MESHSERVE_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS", raising=False)
    # both cuts are opt-in until measured (layers/backend_selection.py)
    monkeypatch.setenv("MESHSERVE_NORM_GEMV", "1" if fold else "0")
    monkeypatch.setenv("MESHSERVE_DECODE_CONTEXT_BOUNDS", bounds or "256,1024")
    return LLM(
        model=model,
        load_format="dummy",
        dtype=dtype,
        max_model_len=4096,
        enforce_eager=eager,
        hf_overrides={"num_hidden_layers": 3},
        gpu_memory_utilization=0.5,
        max_num_seqs=32,
        seed=0,
    )


def _shutdown(llm, allocated_before: int) -> None:
    """Shut the engine down and check its memory went back at once (not when the cyclic collector runs): the
    next LLM's profile counts whatever is still allocated as its own peak (engine/kv_pool.py)."""
    llm.shutdown()
    left = torch.cuda.memory_allocated() - allocated_before
    assert left < 2**30, f"{left / 2**30:.2f} GiB still allocated after LLM.shutdown()"


def _prompt(n: int, seed: int) -> dict:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randint(0, 10000) for _ in range(n)]}


# contexts 200 -> 280 (crosses 256) and 1000 -> 1080 (crosses 1,024), one at a time (batch 1)
PROMPTS = [(200, 1), (1000, 2)]


def _greedy(llm, max_tokens: int = 80) -> list[list[int]]:
    from meshserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [llm.generate([_prompt(n, s)], params, use_tqdm=False)[0].outputs[0].token_ids for n, s in PROMPTS]


# the MoE preset too: short-context graphs by default since 2026-12-03 (backend_selection._small_gqa)
@pytest.mark.parametrize("model", [*MODELS, "qwen3-30b-a3b"])
def test_short_context_graphs_keep_greedy_tokens_fp32(model, monkeypatch):
    # fp32: no GEMV or fold runs, so only the attention split counts differ between the three
    before = torch.cuda.memory_allocated()
    eager = _llm(model, "float32", monkeypatch, eager=True)
    expected = _greedy(eager)
    _shutdown(eager, before)
    full_only = _llm(model, "float32", monkeypatch, bounds="none")
    assert _greedy(full_only) == expected
    _shutdown(full_only, before)
    llm = _llm(model, "float32", monkeypatch)
    graphs = llm.engine.runner.graphs
    assert graphs.variants[1][:-1] == [256, 1024], graphs.variants  # both bounds split differently at batch 1
    picked = []
    variant = graphs.variant
    monkeypatch.setattr(graphs, "variant", lambda n, ctx: picked.append(variant(n, ctx)) or variant(n, ctx))
    assert _greedy(llm) == expected
    assert {(1, 256), (1, 1024), (1, 4096)} <= set(picked)
    _shutdown(llm, before)  # while this test still holds the graphs (and they the runner's forward)


@pytest.mark.parametrize("model", MODELS)
def test_norm_fold_keeps_bf16_decode(model, monkeypatch):
    from meshserve import SamplingParams
    from meshserve.kernels import triton_gemv

    calls = []
    fused = triton_gemv.rms_norm_gemv
    monkeypatch.setattr(triton_gemv, "rms_norm_gemv", lambda *a, **k: calls.append(1) or fused(*a, **k))
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=1)
    runs = {}
    before = torch.cuda.memory_allocated()
    for fold in (False, True):
        calls.clear()
        llm = _llm(model, "bfloat16", monkeypatch, fold=fold)
        assert bool(calls) == fold  # captured into the batch-1 graphs only when the switch is on
        runs[fold] = [llm.generate([_prompt(n, s)], params, use_tqdm=False)[0].outputs[0] for n, s in PROMPTS]
        _shutdown(llm, before)
    for plain, folded in zip(runs[False], runs[True]):
        # the fold keeps rms_norm's roundings; only the fp32 sum of squares is ordered differently, which can
        # move a normed bf16 value by one ulp: the same tokens until a near-tie, the same logprobs closely
        assert folded.token_ids[:16] == plain.token_ids[:16]
        same = sum(a == b for a, b in zip(folded.token_ids, plain.token_ids))
        assert same >= 0.9 * len(plain.token_ids)
        for step in range(16):
            a, b = plain.logprobs[step], folded.logprobs[step]
            tok = plain.token_ids[step]
            assert b[tok].logprob == pytest.approx(a[tok].logprob, abs=0.15)


@pytest.mark.parametrize("model", MODELS)
def test_inline_reduce_keeps_greedy_tokens_fp32(model, monkeypatch):
    # MESHSERVE_DECODE_REDUCE=inline: each group's last split reduces (no reduce launch), in the batch-1
    # graphs' split counts of both context bounds; fp32: only the reduce's summation order differs
    from meshserve.kernels import triton_attention

    before = torch.cuda.memory_allocated()
    runs = {}
    for mode in ("kernel", "inline"):
        monkeypatch.setenv("MESHSERVE_DECODE_REDUCE", mode)
        llm = _llm(model, "float32", monkeypatch, fold=False)
        assert llm.engine.runner.kernels.decode_inline_reduce == (mode == "inline")
        runs[mode] = _greedy(llm)
        _shutdown(llm, before)
    assert runs["inline"] == runs["kernel"]
    assert not triton_attention._ticket_workspace(torch.device("cuda", torch.cuda.current_device())).any()
