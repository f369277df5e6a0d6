"""One-launch softmax top-k routing (kernels/triton_moe_routing.py) against softmax_topk_ref and the layer's
routing functions it stands in for (SoftmaxTopK; GroupedTopK as DeepSeek-V2-Lite configures it)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.moe_ref import softmax_topk_ref
from meshserve.layers.moe_routing import GroupedTopK, SoftmaxTopK

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
interp = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run only without CUDA")


def _check(logits: torch.Tensor, top_k: int, renormalize: bool, scaling: float) -> None:
    from meshserve.kernels.triton_moe_routing import softmax_topk

    experts = logits.shape[1]
    load = torch.full((experts,), 5, dtype=torch.int64, device=logits.device)
    load_ref = load.clone()
    weights, ids = softmax_topk(logits, top_k, renormalize, scaling, load)
    ref_weights, ref_ids = softmax_topk_ref(logits, top_k, renormalize, scaling, load_ref)
    assert (
        weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (logits.shape[0], top_k)
    )
    assert torch.equal(ids, ref_ids)  # both descending by probability (no ties in random logits)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    assert torch.equal(load, load_ref) and load.sum() == 5 * experts + ids.numel()


@interp
@pytest.mark.parametrize("experts,top_k,renormalize,scaling", [(12, 3, True, 2.5), (20, 6, False, 1.0)])
def test_softmax_topk_matches_reference(experts, top_k, renormalize, scaling):
    """Expert and slot counts that are no power of two (padding lanes never picked), counts accumulated."""
    gen = torch.Generator().manual_seed(experts)
    _check(torch.randn(7, experts, generator=gen).to(torch.bfloat16), top_k, renormalize, scaling)


@interp
def test_layer_routings_that_are_a_softmax_topk_say_so():
    """as_softmax_topk: the kernel's arguments reproduce SoftmaxTopK and V2's greedy GroupedTopK (as sets of
    experts: GroupedTopK's top-k is unsorted); V3's sigmoid with a correction bias is no softmax top-k."""
    logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    v2 = GroupedTopK(4, 1, 1, "softmax", "max", renormalize=False, scaling_factor=1.5)
    for routing in (SoftmaxTopK(4, renormalize=True), v2):
        weights, ids = routing(logits)
        top_k, renormalize, scaling = routing.as_softmax_topk()
        got_weights, got_ids = softmax_topk_ref(logits, top_k, renormalize, scaling)
        order, got_order = ids.sort(dim=1), got_ids.sort(dim=1)
        assert torch.equal(order.values, got_order.values)
        torch.testing.assert_close(weights.gather(1, order.indices), got_weights.gather(1, got_order.indices))
    v3 = GroupedTopK(4, 4, 2, "sigmoid", "top2_sum", True, 2.5, torch.zeros(16))
    assert v3.as_softmax_topk() is None
    assert GroupedTopK(4, 4, 2, "softmax", "max", False, 1.0).as_softmax_topk() is None  # group-limited


# compiled for sm_90 beside the GEMV kernels it feeds: test_triton_moe_gemv.py


@pytest.mark.gpu
@pytest.mark.parametrize(
    "experts,top_k,renormalize", [(128, 8, True), (64, 6, False)], ids=["qwen3", "v2-lite"]
)
@pytest.mark.parametrize("tokens", [1, 256, 2048])
def test_softmax_topk_matches_reference_gpu(experts, top_k, renormalize, tokens):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    _check(
        torch.randn(tokens, experts, device="cuda", generator=gen).to(torch.bfloat16), top_k, renormalize, 1.0
    )
