"""The fused Triton MoE path against the torch reference (kernels/moe_ref.py): grouped GEMMs and the
small-batch GEMV path, with expert ids of -1 (other expert-parallel ranks' experts) among them."""

from __future__ import annotations

import pytest
import torch

from meshserve.kernels.moe_ref import fused_experts_ref
from meshserve.layers.moe_routing import SoftmaxTopK


def _case(tokens: int, experts: int, top_k: int, hidden: int, width: int, dtype, device, drop: bool = False):
    gen = torch.Generator(device="cpu").manual_seed(tokens * 131 + experts)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    w13 = (torch.randn(experts, 2 * width, hidden, generator=gen) / hidden**0.5).to(device, dtype)
    w2 = (torch.randn(experts, hidden, width, generator=gen) / width**0.5).to(device, dtype)
    logits = torch.randn(tokens, experts, generator=gen).to(device)
    weights, ids = SoftmaxTopK(top_k, renormalize=True)(logits)
    if drop:  # as on expert-parallel rank 0 of 2: the upper half of the experts live elsewhere
        ids = torch.where(ids < experts // 2, ids, -1)
    return x, w13, w2, weights, ids


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 2, 7, 64, 333])
@pytest.mark.parametrize("experts,top_k", [(8, 2), (128, 8)], ids=["mixtral", "qwen3moe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("drop", [False, True], ids=["all-local", "ep-half"])
def test_fused_experts_match_reference(tokens, experts, top_k, dtype, drop):
    from meshserve.kernels.triton_moe import fused_experts

    x, w13, w2, weights, ids = _case(tokens, experts, top_k, 256, 192, dtype, "cuda", drop)
    got = fused_experts(x, w13, w2, weights, ids)
    ref = fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_align_by_expert_groups_pairs_in_padded_runs():
    from meshserve.kernels.triton_moe import align_by_expert

    ids = torch.tensor([[2, 0], [2, -1], [1, 2]], dtype=torch.int32, device="cuda")
    rows, block_expert, used = align_by_expert(ids, num_experts=4, block_m=4)
    pad = ids.numel()
    # expert 0: pair 1; expert 1: pair 4; expert 2: pairs 0, 2, 5; expert 3: none; pair 3 (-1) dropped
    assert rows[:12].tolist() == [1, pad, pad, pad, 4, pad, pad, pad, 0, 2, 5, pad]
    assert block_expert[:3].tolist() == [0, 1, 2] and used.item() == 12


_INTERPRETED = """
import torch
from meshserve.kernels import triton_moe
from meshserve.kernels.moe_ref import fused_experts_ref
from tests.kernels.test_triton_moe import _case
for tokens, experts, top_k, drop in ((1, 8, 2, False), (2, 32, 4, True), (37, 8, 2, True), (9, 32, 4, False)):
    x, w13, w2, weights, ids = _case(tokens, experts, top_k, 64, 48, torch.float32, "cpu", drop)
    got = triton_moe.fused_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, fused_experts_ref(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)
print("ok")
"""


def test_kernels_match_reference_in_the_triton_interpreter():
    """Without a GPU: the same kernels run by Triton's interpreter (both the pair-GEMV and the grouped-GEMM
    path, with -1 ids), so their indexing is checked on every CPU run."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
