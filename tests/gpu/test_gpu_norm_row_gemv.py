"""MESHSERVE_NORM_ROW_GEMV=1 on the GPU (kernels/triton_norm_row_gemv.py): at batch 1 the QKV's norm and an MoE
block's router's norm each run inside their GEMV's one launch, the router's writing the normed row its experts
read. Greedy bf16 decodes (CUDA graphs, PDL as the default selects it) agree with the switch off up to a
near-tie, and the kernel is the one that ran. The kernel's own tests: tests/kernels/test_triton_norm_row_gemv.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_decode_fixed_cost import PROMPTS, _llm, _prompt
from tests.near_tie import assert_agree_until_near_tie

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "qwen3-0.6b"])
def test_one_launch_norms_keep_bf16_decode(model, monkeypatch):
    from meshserve import SamplingParams
    from meshserve.kernels import triton_norm_row_gemv

    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=3)
    real = triton_norm_row_gemv.norm_row_gemv
    routed = []
    runs = {}
    for on in (False, True):
        monkeypatch.setenv("MESHSERVE_NORM_ROW_GEMV", "1" if on else "0")
        monkeypatch.setattr(triton_norm_row_gemv, "norm_row_gemv",
                            lambda *a, **k: routed.append(bool(k.get("normed_out"))) or real(*a, **k))
        llm = _llm(model, "bfloat16", monkeypatch, fold=False)
        try:
            runs[on] = [llm.generate([_prompt(n, s)], params, use_tqdm=False)[0].outputs[0] for n, s in PROMPTS]
        finally:
            llm.shutdown()
            monkeypatch.setattr(triton_norm_row_gemv, "norm_row_gemv", real)
        if not on:
            assert routed == []
    assert routed and (any(routed) == (model == "qwen3-30b-a3b"))
    for plain, one_launch in zip(runs[False], runs[True]):
        assert_agree_until_near_tie(plain, one_launch, tie=0.2, close=0.15)
