"""MESHSERVE_GEMV_ACT_OUT on the GPU (kernels/triton_gemv.gemv / rms_norm_gemv act_out): at batch 1 the gate/up
GEMV writes silu(gate) * up from its epilogue, the separate SiLU launch gone. Its output is the GEMV-then-SiLU
kernels' bit for bit (tests/kernels/test_triton_ops.py, test_triton_gemv.py), so greedy bf16 decodes of
Llama-3.1-8B's shape (3 layers; K 14,336: the down GEMV does not take the gated input there) give the same tokens
and logprobs with the switch on and off, with the norm in its own kernel and inside the GEMV (MESHSERVE_NORM_GEMV),
and the epilogue is what ran.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_decode_fixed_cost import PROMPTS, _prompt

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("norm_gemv", ["0", "1"])  # 1: the norm inside the gate/up GEMV too (rms_norm_gemv)
def test_act_out_keeps_bf16_decode_bits(norm_gemv, monkeypatch):
    from meshserve import LLM, SamplingParams
    from meshserve.kernels import triton_gemv

    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=3)
    name = "rms_norm_gemv" if norm_gemv == "1" else "gemv"  # the function whose act_out the layer calls
    real = getattr(triton_gemv, name)
    calls = []
    runs = {}
    monkeypatch.setenv("MESHSERVE_NORM_GEMV", norm_gemv)
    for on in (False, True):
        monkeypatch.setenv("MESHSERVE_GEMV_ACT_OUT", "1" if on else "0")
        def counted(*a, _on=on, **k):
            calls.append(_on and k.get("act_out", False))
            return real(*a, **k)

        monkeypatch.setattr(triton_gemv, name, counted)
        llm = LLM(model="llama-3.1-8b", load_format="dummy", dtype="bfloat16", max_model_len=4096,
                  hf_overrides={"num_hidden_layers": 3}, gpu_memory_utilization=0.5, max_num_seqs=32, seed=0)
        try:
            runs[on] = [llm.generate([_prompt(n, s)], params, use_tqdm=False)[0].outputs[0] for n, s in PROMPTS]
        finally:
            llm.shutdown()
            monkeypatch.setattr(triton_gemv, name, real)
    assert any(calls)
    for off, on in zip(runs[False], runs[True]):
        assert off.token_ids == on.token_ids
        assert off.logprobs == on.logprobs and off.cumulative_logprob == on.cumulative_logprob
