"""The TP path that all-reduces each row-parallel projection together with the next residual add + RMSNorm
(MESHSERVE_TP_FUSED_NORM, layers/all_reduce_norm.py). On CPU the all-reduce and the norm stay apart (gloo,
then the norm layer), so this checks the wiring: projections leave their sums unreduced, every partial sum
is reduced exactly once, and the model gives one device's tokens. The fused kernel itself:
tests/kernels/test_triton_all_reduce_norm.py."""

from __future__ import annotations

import random

import pytest

from meshserve import LLM, SamplingParams
from meshserve.layers.backend_selection import TP_FUSED_NORM_ENV
from tests.conftest import VOCAB

MAX_NEW = 6


def _tokens(llm: LLM, prompts) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_tp2_fused_norm_path_gives_one_device_tokens(tiny_model_dir, monkeypatch):
    from meshserve.models import llama

    path = tiny_model_dir("llama")
    rng = random.Random(7)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 18, 11)]
    single_llm = LLM(model=path)
    try:
        single = _tokens(single_llm, prompts)
    finally:
        single_llm.shutdown()

    calls = []  # rank 0's model runs in this process: count its fused calls

    def counting(norm, partial, residual):
        calls.append(residual is None)
        return all_reduce_rms_norm(norm, partial, residual)

    all_reduce_rms_norm = llama.all_reduce_rms_norm
    monkeypatch.setattr(llama, "all_reduce_rms_norm", counting)
    monkeypatch.setenv(TP_FUSED_NORM_ENV, "1")  # read by every rank's kernel selection (rank 1 inherits it)
    llm = LLM(model=path, tensor_parallel_size=2, max_num_batched_tokens=16, block_size=4)
    try:
        assert llm.engine.runner.kernels.tp_fused_norm
        model = llm.engine.runner.model.model
        assert model.can_fuse_all_reduce_norm
        got = _tokens(llm, prompts)
    finally:
        llm.shutdown()
    assert got == single
    # per forward: the embedding's sum with the first norm (no residual yet), o_proj's with the second,
    # down_proj's with the next layer's first norm or the final norm
    per_forward = 2 * len(model.layers) + 1
    assert calls and len(calls) % per_forward == 0
    assert sum(calls) == len(calls) // per_forward


def test_one_device_keeps_the_unfused_path(tiny_model_dir):
    """Without TP or without the switch the model never takes the partial-sum path."""
    llm = LLM(model=tiny_model_dir("llama"))
    try:
        assert not llm.engine.runner.model.model.can_fuse_all_reduce_norm
        assert not llm.engine.runner.kernels.tp_fused_norm
    finally:
        llm.shutdown()


def test_switch_values(monkeypatch):
    from meshserve.layers.backend_selection import select_kernels
    from tests.layers.test_backend_selection import _config

    monkeypatch.delenv(TP_FUSED_NORM_ENV, raising=False)
    assert select_kernels(_config()).tp_fused_norm == ""
    for value, want in (("0", ""), ("1", "pull"), ("pull", "pull"), ("PUSH", "push")):
        monkeypatch.setenv(TP_FUSED_NORM_ENV, value)
        assert select_kernels(_config()).tp_fused_norm == want
    monkeypatch.setenv(TP_FUSED_NORM_ENV, "yes")
    with pytest.raises(ValueError, match="MESHSERVE_TP_FUSED_NORM takes 0, 1 \\(pull\\) or push"):
        select_kernels(_config())
