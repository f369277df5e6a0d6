"""MoE presets (2 layers, dummy weights) on GPUs: the fast path (fused Triton MoE, Triton attention, CUDA graphs)
gives the torch reference's greedy tokens in fp32 and close bf16 logprobs; EP = 2 and TP = 2 on two GPUs (NCCL)
give one GPU's tokens. Each run is its own process."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RUNNER = os.path.join(os.path.dirname(__file__), "moe_run.py")
MODELS = ["qwen3-30b-a3b", "mixtral-8x7b"]


@functools.cache
def _run(model: str, dtype: str, tp: int = 1, ep: bool = False, fast: bool = True) -> dict:
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    args = [sys.executable, RUNNER, model, dtype, str(tp), str(int(ep)), str(int(fast))]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("model", MODELS)
def test_fast_path_fp32_tokens_equal_reference(model):
    ref, fast = _run(model, "float32", fast=False), _run(model, "float32")
    assert fast["graphs"] and not ref["graphs"]
    assert fast["tokens"] == ref["tokens"] and fast["batch1_tokens"] == ref["batch1_tokens"]
    assert fast["expert_tokens"] > 0
    # every prompt position, not only the last (which alone decides the tokens): in fp32 the fused MoE and the
    # attention kernels multiply in IEEE fp32, so no routing tie is near enough to flip
    a = torch.tensor([x for p in ref["prompt_logprobs"] for x in p])
    b = torch.tensor([x for p in fast["prompt_logprobs"] for x in p])
    print(f"{model} fp32: {len(a)} prompt positions, max |fast - reference| {float((b - a).abs().max()):.2e}")
    torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-4)


# A bf16 router logit is rounded to ~3 significant digits, and the two paths' hidden states differ by bf16
# rounding (the reference's expert loop and attention round in other places than the fused kernels), so a near
# tie may go the other way and the token take another expert: for Mixtral's top-2, half of its MoE output. On an
# H100 (2026-12-05) 28 of Mixtral's 959 positions (2.9%) differed past the tolerance, every one at a reference
# margin of 0-0.093 standard deviations of the row's logits, and none of Qwen3-MoE's;
# in fp32 every position agreed within 2.5e-5 (the test above). So positions within ROUTE_TIE of another choice
# may differ, at most MAX_TIE_FLIPS of all positions (twice the measured), and every other one must be close.
ROUTE_TIE = 0.15
MAX_TIE_FLIPS = 0.06


@pytest.mark.parametrize("model", MODELS)
def test_fast_path_bf16_prompt_logprobs_close(model):
    ref, fast = _run(model, "bfloat16", fast=False), _run(model, "bfloat16")
    excused = total = 0
    for i, (a, b, margins) in enumerate(zip(ref["prompt_logprobs"], fast["prompt_logprobs"], ref["route_margins"],
                                            strict=True)):
        a, b, margins = torch.tensor(a), torch.tensor(b), torch.tensor(margins)
        far = ~torch.isclose(b, a, atol=0.15, rtol=0.02)
        unexplained = [(m, round(float(a[m]), 3), round(float(b[m]), 3), round(float(margins[m]), 4))
                       for m in far.nonzero().flatten().tolist() if margins[m] >= ROUTE_TIE]
        assert not unexplained, f"prompt {i}: (position, reference, fast, routing margin) {unexplained}"
        if far.any():  # (shown with -s)
            print(f"{model} prompt {i}: differ at near-ties (position, routing margin):",
                  [(m, round(float(margins[m]), 4)) for m in far.nonzero().flatten().tolist()])
        excused += int(far.sum())
        total += len(a)
    assert excused <= MAX_TIE_FLIPS * total, f"{excused} of {total} positions differ at routing near-ties"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("ep", [True, False], ids=["ep2", "tp2"])
@pytest.mark.parametrize("model", MODELS)
def test_two_gpus_fp32_tokens_equal_one_gpu(model, ep):
    one, two = _run(model, "float32"), _run(model, "float32", tp=2, ep=ep)
    assert two["graphs"]
    assert two["tokens"] == one["tokens"] and two["batch1_tokens"] == one["batch1_tokens"]
    # every rank routes the whole batch: rank 0's counts are the group's
    assert two["expert_tokens"] == one["expert_tokens"]
