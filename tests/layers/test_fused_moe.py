"""FusedMoE over two gloo ranks: tensor-parallel experts and both expert-parallel exchanges (all-to-all,
all-gather) give one device's output, for batches that split unevenly (and one rank left with no token)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from meshserve.distributed import parallel_state
from meshserve.layers.fused_moe import FusedMoE
from meshserve.layers.moe_routing import SoftmaxTopK

EXPERTS, TOP_K, HIDDEN, WIDTH = 8, 3, 16, 12
BATCHES = (7, 1, 2, 0)


def _weights():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(EXPERTS, 2 * WIDTH, HIDDEN, generator=gen), torch.randn(EXPERTS, HIDDEN, WIDTH, generator=gen))


def _layer(w13, w2, routing=None) -> FusedMoE:
    layer = FusedMoE(EXPERTS, HIDDEN, WIDTH, routing or SoftmaxTopK(TOP_K, renormalize=True))
    for param, full, part in ((layer.w13_weight, w13, "gate_up"), (layer.w2_weight, w2, "down")):
        layer.weight_loader(param, full, (None, part))
    return layer


def _inputs(n: int):
    gen = torch.Generator().manual_seed(100 + n)
    return torch.randn(n, HIDDEN, generator=gen), torch.randn(n, EXPERTS, generator=gen)


def _rank(rank: int, port: int, folder: str) -> None:
    parallel_state.init_parallel_state(2, 1, rank, "127.0.0.1", port, "gloo", 30.0)
    st = parallel_state.get_parallel_state()
    out = {}
    for mode in ("tp", "all_to_all", "all_gather"):
        st.expert_parallel = mode != "tp"
        layer = _layer(*_weights())
        if st.expert_parallel:
            layer.ep_exchange = mode
        out[mode] = ([layer(*_inputs(n)) for n in BATCHES], layer.expert_load.clone())
    # a file, not a multiprocessing.Manager: tensors pickled to a manager travel as shared-memory handles, and
    # that exchange broke under load (EOFError from the manager's connection in a CI run)
    torch.save(out, os.path.join(folder, f"{rank}.pt"))
    parallel_state.destroy_parallel_state()


def test_two_ranks_match_one_device(tmp_path):
    from meshserve.distributed.launch import free_port

    single = _layer(*_weights())
    expected = [single(*_inputs(n)) for n in BATCHES]
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    results = {rank: torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)}
    for mode in ("tp", "all_to_all", "all_gather"):
        for rank in (0, 1):
            outs, load = results[rank][mode]
            for got, want in zip(outs, expected, strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            # every rank routes (and counts) every token, whichever layout
            assert torch.equal(load, single.expert_load)
    assert single.expert_load.sum() == TOP_K * sum(BATCHES)


def test_fused_routing_path_matches_the_routing_function_and_counts():
    """With fused ops bound (the fused softmax top-k route: kernels/moe.softmax_topk, its reference on CPU)
    the layer gives the plain path's output and expert counts; DeepSeek-V2's greedy GroupedTopK likewise."""
    from meshserve.layers.backend_selection import PLAIN, KernelSelection
    from meshserve.layers.moe_routing import GroupedTopK

    w13, w2 = _weights()
    x, logits = _inputs(9)
    for routing in (SoftmaxTopK(TOP_K, renormalize=True), GroupedTopK(TOP_K, 1, 1, "softmax", "max", False, 1.5)):
        outs, loads = [], []
        for kernels in (PLAIN, KernelSelection(fused_ops=True)):
            layer = _layer(w13, w2, routing)
            layer.kernels = kernels
            outs.append(layer(x, logits))
            loads.append(layer.expert_load.clone())
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(loads[1], loads[0]) and loads[0].sum() == TOP_K * 9


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8, 100, 600])
def test_new_and_legacy_triton_paths_match_the_plain_layer_in_a_cuda_graph(tokens):
    """Qwen3-30B-A3B's routing (128 experts, top-8) at small widths, bf16 on a GPU: the new path (fused routing,
    GEMV at 1 token, Triton align and the grouped GEMM from 8) and MESHSERVE_MOE_LEGACY's path, each captured in a CUDA
    graph and replayed on new inputs, give the plain layer's output and expert counts; the one-launch routing +
    align (MESHSERVE_MOE_ROUTE_ALIGN=fused; the chain past 512 tokens) gives the new path's bits."""
    from meshserve.layers.backend_selection import PLAIN, KernelSelection

    torch.manual_seed(0)
    experts, top_k, hidden, width = 128, 8, 256, 192
    w13 = torch.randn(experts, 2 * width, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
    w2 = torch.randn(experts, hidden, width, device="cuda", dtype=torch.bfloat16) / width**0.5
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(tokens, experts, device="cuda", dtype=torch.bfloat16)
    results = {}
    for name, kernels in (("plain", PLAIN), ("new", KernelSelection(fused_ops=True)),
                          ("legacy", KernelSelection(fused_ops=True, moe_legacy=True)),
                          ("fused", KernelSelection(fused_ops=True, moe_route_align="fused"))):
        layer = FusedMoE(experts, hidden, width, SoftmaxTopK(top_k, renormalize=True)).to("cuda", torch.bfloat16)
        layer.w13_weight.data.copy_(w13)
        layer.w2_weight.data.copy_(w2)
        layer.kernels = kernels
        if name == "plain":
            x.normal_(generator=torch.Generator(device="cuda").manual_seed(1))
            out = layer(x, logits)
        else:
            x.normal_()
            layer(x, logits)  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = layer(x, logits)
            x.normal_(generator=torch.Generator(device="cuda").manual_seed(1))  # the plain layer's input
            layer.expert_load.zero_()  # (the warm-up's counts)
            graph.replay()
        results[name] = (out.float().clone(), layer.expert_load.clone())
    for name in ("new", "legacy", "fused"):
        torch.testing.assert_close(results[name][0], results["plain"][0], atol=2e-2, rtol=2e-2)
        assert torch.equal(results[name][1], results["plain"][1]), name
    assert results["plain"][1].sum() == tokens * top_k
    # rows land in another order inside an expert's run; each GEMM row and each token's sum are the same
    assert torch.equal(results["fused"][0], results["new"][0])


def test_warmup_token_counts_follow_the_layers_kernels():
    """The start-up warm-up's MoE token counts (engine/eager_warmup.moe_token_counts): the Triton path's
    variants at the layer's experts and top-k, none on the plain path; the model's layers share them."""
    from torch import nn

    from meshserve.engine.eager_warmup import moe_token_counts
    from meshserve.kernels.moe import warmup_token_counts
    from meshserve.layers.backend_selection import KernelSelection

    w13, w2 = _weights()
    layer = _layer(w13, w2)
    assert layer.warmup_token_counts(512, 2) == []
    model = nn.ModuleList([layer, _layer(w13, w2), nn.Linear(2, 2)])
    for m in model[:2]:
        m.kernels = KernelSelection(fused_ops=True)
    assert layer.warmup_token_counts(512, 2) == warmup_token_counts(512, TOP_K, EXPERTS) == [1, 2, 6, 65, 257]
    assert moe_token_counts(model, 512, 2) == [1, 2, 6, 65, 257]
    model[0].kernels = KernelSelection(fused_ops=True, moe_legacy=True)
    legacy = warmup_token_counts(512, TOP_K, EXPERTS, legacy=True)
    assert moe_token_counts(model, 512, 2) == sorted({1, 2, 6, 65, 257} | set(legacy))
    # the one-launch routing + align: its decode variants, and the chain's again past 512 tokens
    layer.kernels = KernelSelection(fused_ops=True, moe_route_align="fused")
    assert layer.warmup_token_counts(1024, 2) == warmup_token_counts(
        1024, TOP_K, EXPERTS, route_align="fused") == [1, 2, 6, 65, 257, 513]


def test_warmup_token_counts_cover_the_folded_shared_experts():
    """With moe_fuse_shared a layer whose model hands it a shared MLP (foldable_shared_experts set) launches with S more
    pairs a token among S more experts (up to the switch's bound): its warm-up counts are those variants';
    without the switch, or with no shared MLP, the routed experts' alone."""
    from meshserve.kernels.moe import launch_variant, warmup_token_counts
    from meshserve.layers.backend_selection import KernelSelection

    w13, w2 = _weights()
    layer = _layer(w13, w2)
    layer.kernels = KernelSelection(fused_ops=True, moe_fuse_shared=True)
    plain = warmup_token_counts(512, TOP_K, EXPERTS)
    assert layer.warmup_token_counts(512, 2) == plain  # no shared MLP
    layer.foldable_shared_experts = 2
    folded = layer.warmup_token_counts(512, 2)
    assert folded == warmup_token_counts(512, TOP_K, EXPERTS, shared_experts=2, fuse_shared_tokens=512) != plain
    # every variant a folded call of 1..512 tokens takes is reached by one of the counts
    reached = {launch_variant(n, TOP_K, EXPERTS, shared_experts=2) for n in folded}
    assert all(launch_variant(n, TOP_K, EXPERTS, shared_experts=2) in reached for n in range(1, 513))
    layer.kernels = KernelSelection(fused_ops=True, moe_fuse_shared=True, moe_fuse_shared_max_tokens=64)
    bounded = layer.warmup_token_counts(512, 2)
    assert bounded == warmup_token_counts(512, TOP_K, EXPERTS, shared_experts=2, fuse_shared_tokens=64)
    assert set(bounded) - set(folded) and max(bounded) == max(plain)  # unfolded past 64 tokens
    layer.kernels = KernelSelection(fused_ops=True)
    assert layer.warmup_token_counts(512, 2) == plain


def test_the_fused_router_serves_one_token_of_a_softmax_top_k_only():
    """MESHSERVE_MOE_ROUTER_FUSED's wiring: which calls forward_with_router takes, and off the Triton path it is
    forward(hidden, router(hidden)) exactly (the router's linear, then the routing)."""
    from meshserve.layers.backend_selection import KernelSelection
    from meshserve.layers.linear import ReplicatedLinear
    from meshserve.layers.moe_routing import GroupedTopK

    w13, w2 = _weights()
    layer, router = _layer(w13, w2), ReplicatedLinear(HIDDEN, EXPERTS, bias=False)
    router.weight.data.normal_(generator=torch.Generator().manual_seed(3))
    x = _inputs(1)[0]
    assert not layer.routes_with_router(x)  # off by default
    layer.kernels = KernelSelection(moe_router_fused=True)
    assert layer.routes_with_router(x) and not layer.routes_with_router(_inputs(2)[0])
    assert not KernelSelection().moe_router_fused
    expected, load = layer(x, router(x)), layer.expert_load.clone()
    layer.expert_load.zero_()
    assert torch.equal(layer.forward_with_router(x, router), expected) and torch.equal(layer.expert_load, load)
    grouped = _layer(w13, w2, GroupedTopK(TOP_K, num_groups=2, topk_groups=1, scoring="sigmoid", group_score="top2_sum",
                                          renormalize=True, scaling_factor=1.0))
    grouped.kernels = KernelSelection(moe_router_fused=True)
    assert not grouped.routes_with_router(x)  # (not a plain softmax top-k: the routing function serves)


@pytest.mark.gpu
def test_gpu_fused_router_matches_the_router_then_the_layer_in_a_cuda_graph():
    """Qwen3-30B-A3B's routing at small widths, bf16: forward_with_router with the fused launch, captured and
    replayed on a new row, gives the layer's output and counts on the router's logits."""
    from meshserve.layers.backend_selection import KernelSelection
    from meshserve.layers.linear import ReplicatedLinear

    torch.manual_seed(0)
    experts, top_k, hidden, width = 128, 8, 256, 192
    layer = FusedMoE(experts, hidden, width, SoftmaxTopK(top_k, renormalize=True)).to("cuda", torch.bfloat16)
    layer.w13_weight.data.normal_(std=hidden**-0.5)
    layer.w2_weight.data.normal_(std=width**-0.5)
    router = ReplicatedLinear(hidden, experts, bias=False).to("cuda", torch.bfloat16)
    router.weight.data.normal_(std=hidden**-0.5)
    layer.kernels = KernelSelection(fused_ops=True, moe_router_fused=True)
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    layer.forward_with_router(x, router)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer.forward_with_router(x, router)
    x.normal_()
    layer.expert_load.zero_()
    graph.replay()
    torch.cuda.synchronize()
    got, got_load = out.float().clone(), layer.expert_load.clone()
    layer.kernels = KernelSelection(fused_ops=True)
    layer.expert_load.zero_()
    expected = layer(x, layer._router_topk.logits[None])  # the fused launch's logits, routed the plain way
    torch.testing.assert_close(got, expected.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(got_load, layer.expert_load) and got_load.sum() == top_k
