"""MESHSERVE_PDL=1 (kernels/pdl.py) on whole decodes: greedy tokens and logprobs against PDL off.

Batch-1 decodes in CUDA graphs (where PDL becomes programmatic graph edges) with contexts crossing the short
graph variants; a race between a kernel and the one before it would show as changed tokens here.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_decode_fixed_cost import MODELS, PROMPTS, _greedy, _llm, _prompt
from tests.near_tie import assert_agree_until_near_tie

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _restore_pdl_switch():
    from meshserve.kernels import pdl

    with pdl.enabled(pdl.is_enabled()):  # the runners bind it for the process: leave it as found
        yield


def _pdl_llm(model, dtype, monkeypatch, pdl: bool, fold: bool = False):
    from meshserve.kernels import pdl as pdl_mod

    monkeypatch.setenv("MESHSERVE_PDL", "1" if pdl else "0")
    llm = _llm(model, dtype, monkeypatch, fold=fold)
    # the core runs in this process: the runner bound the switch (PDL needs sm_90+)
    assert pdl_mod.is_enabled() == pdl
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        llm.shutdown()
        pytest.skip("PDL needs sm_90 or newer")
    return llm


@pytest.mark.parametrize("model", MODELS)
def test_pdl_keeps_greedy_tokens_fp32(model, monkeypatch):
    # fp32: norm, prologue, KV write and decode attention run with PDL (the GEMVs serve 16-bit rows only)
    runs = {}
    for pdl in (False, True):
        llm = _pdl_llm(model, "float32", monkeypatch, pdl)
        runs[pdl] = _greedy(llm)
        llm.shutdown()
    assert runs[True] == runs[False]


@pytest.mark.parametrize("model,fold", [("qwen3-0.6b", False), ("llama-3.1-8b", True), ("qwen3-0.6b", True)])
def test_pdl_keeps_bf16_decode(model, fold, monkeypatch):
    from meshserve import SamplingParams

    # logprobs=3: both sides of a near-tie in both runs' top logprobs
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=3)
    runs = {}
    for pdl in (False, True):
        llm = _pdl_llm(model, "bfloat16", monkeypatch, pdl, fold=fold)
        runs[pdl] = [llm.generate([_prompt(n, s)], params, use_tqdm=False)[0].outputs[0] for n, s in PROMPTS]
        llm.shutdown()
    for plain, overlapped in zip(runs[False], runs[True]):
        # the PDL GEMV sums its preloaded columns apart from the rest (fp32 order only), and random bf16 weights
        # leave near-ties: the same tokens and logprobs until the first divergence, which must be a near-tie
        # (measured on an H200: qwen3-0.6b's first prompt diverged at step 15)
        assert_agree_until_near_tie(plain, overlapped, tie=0.2, close=0.15)


# the A/B variants of kernels/pdl.py (tools/pdl_device.sh): a late trigger or a launch gone plain must keep the
# chain as safe as the measured layout
VARIANTS = [{"MESHSERVE_PDL_TRIGGER": "late"}, {"MESHSERVE_PDL_ONE_WAVE": "1"},
            {"MESHSERVE_PDL_PRELOAD": "none", "MESHSERVE_PDL_TRIGGER": "late"}, {"MESHSERVE_PDL_PRELOAD": "row"},
            # a large dense model's auto policy (pdl.auto_policy): one-row decode steps, whole rows preloaded only
            {"MESHSERVE_PDL_PRELOAD": "row", "MESHSERVE_PDL_STEPS": "one"}]


@pytest.mark.parametrize("model", MODELS)
def test_pdl_variants_keep_bf16_decode(model, monkeypatch):
    from meshserve import SamplingParams
    from meshserve.kernels import pdl as pdl_mod

    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=3)

    def run(pdl: bool):
        llm = _pdl_llm(model, "bfloat16", monkeypatch, pdl, fold=False)
        policy = pdl_mod.policy()
        outs = [llm.generate([_prompt(n, s)], params, use_tqdm=False)[0].outputs[0] for n, s in PROMPTS]
        llm.shutdown()
        return policy, outs

    _, plain = run(False)
    for variant in VARIANTS:
        for name, value in variant.items():
            monkeypatch.setenv(name, value)
        policy, outs = run(True)
        assert policy.trigger == variant.get("MESHSERVE_PDL_TRIGGER", "early"), policy
        assert policy.preload == variant.get("MESHSERVE_PDL_PRELOAD", "all"), policy
        for a, b in zip(plain, outs):
            assert_agree_until_near_tie(a, b, tie=0.2, close=0.15)
        for name in variant:
            monkeypatch.delenv(name)


# MoE presets (MESHSERVE_PDL=auto turns PDL on for them since 2026-12-03, after this test passed on an H200; W1
# there: Qwen3-30B-A3B 255.0 -> 282.3 tok/s, DeepSeek-V2-Lite 327.8 -> 338.0) and a dense one, with prompts
# chunked beside decodes
@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "deepseek-v2-lite", "qwen3-0.6b"])
def test_pdl_keeps_batched_decode_with_mixed_steps(model, monkeypatch):
    from meshserve import LLM, SamplingParams
    from meshserve.kernels import pdl as pdl_mod

    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=3)
    prompts = [_prompt(n, 10 + i) for i, n in enumerate((50, 300, 700, 120, 1000, 30))]
    runs = {}
    for pdl in (False, True):
        monkeypatch.setenv("MESHSERVE_PDL", "1" if pdl else "0")
        # a 256-token step budget: the long prompts' chunks share steps with the short ones' decodes, so mixed
        # steps (launched plain: pdl.step_scope) and decode-only steps (PDL, in graphs) alternate
        llm = LLM(model=model, load_format="dummy", dtype="bfloat16", max_model_len=4096,
                  hf_overrides={"num_hidden_layers": 3}, gpu_memory_utilization=0.5, max_num_seqs=32,
                  max_num_batched_tokens=256, seed=0)
        assert pdl_mod.is_enabled() == pdl and pdl_mod.policy().steps == "decode"
        if pdl and torch.cuda.get_device_capability()[0] < 9:
            llm.shutdown()
            pytest.skip("PDL needs sm_90 or newer")
        runs[pdl] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.shutdown()
    for plain, overlapped in zip(runs[False], runs[True]):
        assert_agree_until_near_tie(plain, overlapped, tie=0.2, close=0.15)


# the MoE layer's own launches under PDL (routing, MoE GEMV; PdlPolicy.moe): batch-1 decodes replay graphs
# where the down GEMV reads the routing's ids before its wait ("preload") against the same launches plain
@pytest.mark.parametrize("moe", ["preload", "launch"])
def test_pdl_moe_launches_keep_batch1_decode(moe, monkeypatch):
    from meshserve import LLM, SamplingParams
    from meshserve.kernels import pdl as pdl_mod

    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=3)
    runs = {}
    for setting in ("0", moe):
        monkeypatch.setenv("MESHSERVE_PDL", "1")
        monkeypatch.setenv("MESHSERVE_PDL_MOE", setting)
        llm = LLM(model="qwen3-30b-a3b", load_format="dummy", dtype="bfloat16", max_model_len=4096,
                  hf_overrides={"num_hidden_layers": 3}, gpu_memory_utilization=0.5, max_num_seqs=8, seed=0)
        assert pdl_mod.policy().moe == ("off" if setting == "0" else moe)
        if torch.cuda.get_device_capability()[0] < 9:
            llm.shutdown()
            pytest.skip("PDL needs sm_90 or newer")
        runs[setting] = [llm.generate([_prompt(n, s)], params, use_tqdm=False)[0].outputs[0] for n, s in PROMPTS]
        llm.shutdown()
    for plain, overlapped in zip(runs["0"], runs[moe]):
        # "launch" changes no arithmetic; "preload" sums the down slots in another fp32 order
        assert_agree_until_near_tie(plain, overlapped, tie=0.2, close=0.15)


# quantized 8B-sized layers: MESHSERVE_PDL=auto (the default) chains the one-row decode steps of per-channel fp8
# and AWQ int4 models (their batch-1 GEMVs wait under PDL after requesting their first weights; pdl.auto_policy)
@pytest.mark.parametrize("quantization", ["fp8", "awq"])
def test_pdl_auto_keeps_quantized_batch1_decode(quantization, monkeypatch):
    from meshserve import LLM, SamplingParams
    from meshserve.kernels import pdl as pdl_mod

    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=3)
    runs = {}
    for setting in ("0", "auto"):
        monkeypatch.setenv("MESHSERVE_PDL", setting)
        llm = LLM(model="llama-3.1-8b", load_format="dummy", dtype="bfloat16", max_model_len=4096,
                  quantization=quantization, hf_overrides={"num_hidden_layers": 4}, gpu_memory_utilization=0.5,
                  max_num_seqs=8, seed=0)
        on = torch.cuda.get_device_capability()[0] >= 9 and setting == "auto"
        assert pdl_mod.is_enabled() == on
        assert not on or (pdl_mod.policy().preload, pdl_mod.policy().steps) == ("row", "one")
        runs[setting] = [llm.generate([_prompt(n, s)], params, use_tqdm=False)[0].outputs[0] for n, s in PROMPTS]
        llm.shutdown()
    for plain, overlapped in zip(runs["0"], runs["auto"]):
        assert_agree_until_near_tie(plain, overlapped, tie=0.2, close=0.15)
