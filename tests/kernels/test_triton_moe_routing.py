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
    # the same logits in the same (descending) order; where a row's logits tie (common in bf16: 8 bits of
    # mantissa) either expert is a right pick, so ids and per-expert loads are compared only for tie-free rows
    assert torch.equal(logits.gather(1, ids.long()), logits.gather(1, ref_ids.long()))
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    assert load.sum() == load_ref.sum() == 5 * experts + ids.numel()
    if all(row.unique().numel() == experts for row in logits):
        assert torch.equal(ids, ref_ids) and torch.equal(load, load_ref)


def _distinct_logits(tokens: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    """Random logits with no ties in a row: a permutation of k/16 (exact in bf16)."""
    keys = torch.rand(tokens, experts, generator=gen, device=gen.device)
    return ((keys.argsort(dim=1) - experts // 2).float() / 16).to(torch.bfloat16)


@interp
@pytest.mark.parametrize("experts,top_k,renormalize,scaling", [(12, 3, True, 2.5), (20, 6, False, 1.0)])
def test_softmax_topk_matches_reference(experts, top_k, renormalize, scaling):
    """Expert and slot counts that are no power of two (padding lanes never picked), counts accumulated."""
    gen = torch.Generator().manual_seed(experts)
    _check(torch.randn(7, experts, generator=gen).to(torch.bfloat16), top_k, renormalize, scaling)
    _check(_distinct_logits(7, experts, gen), top_k, renormalize, scaling)


@interp
def test_tiny_router_logits_still_route_each_token_by_its_own_logits():
    """vLLM's dummy weights give router logits of ~1e-5; a bf16 softmax makes every score 1/64 exactly and a top-k
    of those ties picks the same experts for every token (BENCHMARKS.md, twenty-eighth session). The softmax here
    is float32 (as HF's), so each token's top-6 follows its own logits, in the kernel and in V2's GroupedTopK."""
    from meshserve.kernels.triton_moe_routing import softmax_topk

    gen = torch.Generator().manual_seed(0)
    logits = (_distinct_logits(32, 64, gen).float() * 1e-5).to(torch.bfloat16)  # distinct, ~1e-5
    assert torch.softmax(logits, dim=-1).unique().numel() == 1  # the bf16 softmax: all ties
    want = logits.float().topk(6, dim=-1).indices.sort(dim=1).values
    _, ids = softmax_topk(logits, 6, False, 1.0, None)
    _, v2_ids = GroupedTopK(6, 1, 1, "softmax", "max", renormalize=False, scaling_factor=1.0)(logits)
    for got in (ids, v2_ids):
        assert torch.equal(got.long().sort(dim=1).values, want)
    assert ids.unique().numel() > 48  # 32 tokens x 6 picks spread over most of the 64 experts


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
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "bf16-ties"])
def test_softmax_topk_matches_reference_gpu(experts, top_k, renormalize, tokens, ties):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    if ties:  # randn rounded to bf16 ties within most rows of 64-128 experts
        logits = torch.randn(tokens, experts, device="cuda", generator=gen).to(torch.bfloat16)
    else:
        logits = _distinct_logits(tokens, experts, gen)
    _check(logits, top_k, renormalize, 1.0)
