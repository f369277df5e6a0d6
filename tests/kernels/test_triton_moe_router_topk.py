"""The fused router GEMV + softmax top-k (kernels/triton_moe_router_topk.py) against F.linear then softmax_topk_ref:
Triton's interpreter on CPU, a CUDA graph's replays on a GPU, the sm_90 compile without one."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from meshserve.kernels.moe_ref import softmax_topk_ref
from tests.kernels.sm90 import COMPILE_SM90_PRELUDE, assert_compiles_for_sm90

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
interp = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run only without CUDA")


def _check(router, x, w, top_k, renormalize, scaling):
    """One launch against the reference: the logits the kernel stored (F.linear's up to the fp32 sums' order) and
    their routing by softmax_topk_ref: the weights, ids and load counts."""
    load = torch.full((w.shape[0],), 3, dtype=torch.int64, device=x.device)
    load_ref = load.clone()
    weights, ids = router(x, w, top_k, renormalize, scaling, load)
    logits = F.linear(x.float(), w.float()).to(x.dtype)
    torch.testing.assert_close(router.logits.float(), logits[0].float(), atol=1e-5, rtol=1e-5)
    ref_weights, ref_ids = softmax_topk_ref(router.logits[None], top_k, renormalize, scaling, load_ref)
    assert weights.shape == ids.shape == (1, top_k) and weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids, ref_ids) and torch.equal(load, load_ref)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    assert router.ticket.item() == 0  # left at zero for the next launch


def _distinct(experts: int, hidden: int, dtype, gen, device="cpu"):
    """x and router rows whose logits have no ties (distinct multiples of 1/16 with x one-hot: exact)."""
    x = torch.zeros(1, hidden, dtype=dtype, device=device)
    x[0, 3] = 1
    w = torch.randn(experts, hidden, generator=gen).to(device, dtype)
    w[:, 3] = ((torch.randperm(experts, generator=gen) - experts // 2).float() / 16).to(device, dtype)
    return x, w


@interp
@pytest.mark.parametrize("experts,top_k,renormalize,scaling,hidden", [(12, 3, True, 2.5, 40), (20, 6, False, 1.0, 600)])
def test_router_topk_matches_linear_then_softmax_topk(experts, top_k, renormalize, scaling, hidden):
    """Experts no multiple of the programs' 4 rows, a hidden past one 512-wide tile; the same layer's state
    launched again (the ticket reset by the last program)."""
    from meshserve.kernels.triton_moe_router_topk import RouterTopK

    gen = torch.Generator().manual_seed(experts)
    router = RouterTopK(experts, torch.device("cpu"), torch.float32)
    for _ in range(2):
        _check(router, *_distinct(experts, hidden, torch.float32, gen), top_k, renormalize, scaling)
    x, w = torch.randn(1, hidden, generator=gen), torch.randn(experts, hidden, generator=gen)
    _check(router, x, w, top_k, renormalize, scaling)


@interp
def test_router_topk_refuses_what_it_cannot_serve():
    from meshserve.kernels.triton_moe_router_topk import RouterTopK

    router = RouterTopK(8, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="one row of 16 features"):
        router(torch.zeros(2, 16), torch.zeros(8, 16), 2, True)
    with pytest.raises(ValueError, match="top_k 9 > 8 experts"):
        router(torch.zeros(1, 16), torch.zeros(8, 16), 9, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_router_topk_in_a_cuda_graph_at_qwen3_moe_shape():
    """Qwen3-30B-A3B's router (128 experts x 2,048, top-8, renormalized), bf16: a CUDA graph replayed on new
    rows routes each as the reference routes the kernel's logits, the ticket back at zero after each replay."""
    from meshserve.kernels.triton_moe_router_topk import RouterTopK

    gen = torch.Generator().manual_seed(0)
    x, w = _distinct(128, 2048, torch.bfloat16, gen, "cuda")
    router = RouterTopK(128, torch.device("cuda"), torch.bfloat16)
    load = torch.zeros(128, dtype=torch.int64, device="cuda")
    router(x, w, 8, True, 1.0, load)  # (compiled outside the capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = router(x, w, 8, True, 1.0, load)
    for seed in range(1, 6):
        x.copy_(_distinct(128, 2048, torch.bfloat16, torch.Generator().manual_seed(seed), "cuda")[0])
        w.copy_(_distinct(128, 2048, torch.bfloat16, torch.Generator().manual_seed(seed), "cuda")[1])
        load.zero_()
        graph.replay()
        torch.cuda.synchronize()
        ref_load = torch.zeros_like(load)
        ref_weights, ref_ids = softmax_topk_ref(router.logits[None], 8, True, 1.0, ref_load)
        assert torch.equal(ids, ref_ids) and torch.equal(load, ref_load) and router.ticket.item() == 0
        torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
        logits = F.linear(x.float(), w.float())[0]
        torch.testing.assert_close(router.logits.float(), logits, atol=0.02, rtol=0.01)


_SCRIPT = COMPILE_SM90_PRELUDE + """
from meshserve.kernels.triton_moe_router_topk import _router_topk_kernel
sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "logits_ptr": "*bf16", "ticket_ptr": "*i32", "weights_ptr": "*fp32",
       "ids_ptr": "*i32", "load_ptr": "*i64", "scaling": "fp32"}
for one_tile in (False, True):  # (Qwen3-30B-A3B's 2,048 features in a loop; rows of up to 512 in one load)
    compile_sm90(_router_topk_kernel, sig, {"TOP_K": 8, "RENORMALIZE": True, "COUNT": True, "BLOCK_ROWS": 4,
                                            "BLOCK_H": 512, "ONE_TILE": one_tile, "BLOCK_E": 128, "BLOCK_K": 8}, 4, 1)
print("compiled")
"""


def test_kernel_compiles_for_sm90():
    assert_compiles_for_sm90(_SCRIPT)
