"""The one-launch routing + align (kernels/triton_moe_route_align.py) against the chain it replaces
(triton_moe_routing.softmax_topk, then triton_moe_align.align_by_expert) and the torch reference
(softmax_topk_ref, then triton_moe.align_by_expert): the same weights and ids (bit for bit against the chain,
whose routing math it shares), the same load counts, and the same alignment up to the order of pairs inside an
expert's run (arrival order of the rank atomics), compared as test_triton_moe_align does."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.moe_ref import fused_experts_ref, softmax_topk_ref
from tests.kernels.sm90 import assert_compiles_for_sm90
from tests.kernels.test_triton_moe_align import assert_same_runs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
interp = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run only without CUDA")


def _check(logits: torch.Tensor, top_k: int, renormalize: bool, scaling: float, block_m: int) -> None:
    from meshserve.kernels import triton_moe, triton_moe_align, triton_moe_routing
    from meshserve.kernels.triton_moe_route_align import route_and_align

    experts = logits.shape[1]
    load = torch.full((experts,), 5, dtype=torch.int64, device=logits.device)
    chain_load, ref_load = load.clone(), load.clone()
    weights, ids, aligned = route_and_align(logits, top_k, renormalize, scaling, load, block_m)
    chain_weights, chain_ids = triton_moe_routing.softmax_topk(logits, top_k, renormalize, scaling, chain_load)
    # the chain: the same math, the same bits; its alignment of the same ids
    assert torch.equal(weights, chain_weights) and torch.equal(ids, chain_ids) and torch.equal(load, chain_load)
    assert_same_runs(aligned, triton_moe_align.align_by_expert(ids, experts, block_m), block_m, every_block=True)
    assert_same_runs(aligned, triton_moe.align_by_expert(ids, experts, block_m), block_m, every_block=True)
    # the torch reference: ties in bf16 logits may pick either expert (test_triton_moe_routing's comparison)
    ref_weights, ref_ids = softmax_topk_ref(logits, top_k, renormalize, scaling, ref_load)
    assert torch.equal(logits.gather(1, ids.long()), logits.gather(1, ref_ids.long()))
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    if all(row.unique().numel() == experts for row in logits):
        assert torch.equal(ids, ref_ids) and torch.equal(load, ref_load)
    # the workspace is left at zero for the next launch
    from meshserve.kernels.triton_moe_route_align import _workspace

    assert int(_workspace(logits.device).abs().sum()) == 0


def _distinct_logits(tokens: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    keys = torch.rand(tokens, experts, generator=gen, device=gen.device)
    return ((keys.argsort(dim=1) - experts // 2).float() / 16).to(torch.bfloat16)


@interp
@pytest.mark.parametrize(
    "tokens,experts,top_k,renormalize,scaling,block_m",
    [(1, 8, 2, True, 1.0, 4), (7, 12, 3, True, 2.5, 4), (37, 20, 6, False, 1.0, 16),
     pytest.param(70, 16, 4, True, 1.0, 8, marks=pytest.mark.slow)],  # ~7 s in the interpreter
)
def test_route_and_align_matches_chain_and_reference(tokens, experts, top_k, renormalize, scaling, block_m):
    """Expert and slot counts that are no power of two, runs of several blocks (70 tokens over 16 experts),
    experts with no pair (1 and 7 tokens), padding prefilled over slices of one or many programs."""
    gen = torch.Generator().manual_seed(tokens)
    _check(torch.randn(tokens, experts, generator=gen).to(torch.bfloat16), top_k, renormalize, scaling, block_m)
    _check(_distinct_logits(tokens, experts, gen), top_k, renormalize, scaling, block_m)


@interp
def test_route_and_align_in_small_steps(monkeypatch):
    """Steps smaller than the calls: the last program places the pairs over several SCATTER steps (each
    loading the next), and each program's padding slice takes several FILL steps."""
    from meshserve.kernels import triton_moe_route_align

    monkeypatch.setattr(triton_moe_route_align, "SCATTER", 32)
    monkeypatch.setattr(triton_moe_route_align, "FILL", 16)
    gen = torch.Generator().manual_seed(5)
    _check(torch.randn(3, 16, generator=gen).to(torch.bfloat16), 4, True, 1.0, 16)  # 256 padded rows: 86 a program
    _check(torch.randn(45, 16, generator=gen).to(torch.bfloat16), 3, False, 1.0, 8)  # 135 pairs: 5 steps


@interp
def test_route_and_align_feeds_the_grouped_gemm():
    """fused_experts with the launch's alignment gives the reference MoE output."""
    from meshserve.kernels import triton_moe
    from meshserve.kernels.moe_configs import GroupedGemmConfig, StageConfigs
    from meshserve.kernels.triton_moe_route_align import route_and_align

    gen = torch.Generator().manual_seed(3)
    tokens, experts, hidden, width, top_k = 21, 8, 64, 48, 2
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * width, hidden, generator=gen) / 8
    w2 = torch.randn(experts, hidden, width, generator=gen) / 8
    logits = torch.randn(tokens, experts, generator=gen)
    configs = StageConfigs(GroupedGemmConfig(16, 32, 32), GroupedGemmConfig(16, 16, 32))
    weights, ids, aligned = route_and_align(logits, top_k, True, 1.0, None, 16)
    got = triton_moe.fused_experts(x, w13, w2, weights, ids, configs=configs, aligned=aligned)
    torch.testing.assert_close(got, fused_experts_ref(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="other pairs, experts or tiles"):  # (BLOCK_M 8, not 16)
        triton_moe.fused_experts(x, w13, w2, weights, ids, configs=configs,
                                 aligned=route_and_align(logits, top_k, True, 1.0, None, 8)[2])
    with pytest.raises(ValueError, match="other pairs"):  # other pairs (a shared MLP's folded in, say)
        triton_moe.fused_experts(x, w13, w2, weights[:, :1], ids[:, :1], configs=configs, aligned=aligned)


def test_serves_decode_calls_only():
    from meshserve.kernels.triton_moe_route_align import MAX_TOKENS, serves

    assert serves(1, 128) and serves(MAX_TOKENS, 128) and not serves(MAX_TOKENS + 1, 64)
    assert not serves(0, 64) and not serves(8, 4096)


_COMPILE_SM90 = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_moe_route_align import FILL, SCATTER, _route_align_kernel
from meshserve.kernels.triton_moe_routing import _softmax_topk_kernel

def compile(kernel, logits, const):
    names = list(kernel.arg_names)
    ptrs = {"logits_ptr": logits, "weights_ptr": "*fp32", "load_ptr": "*i64", "scaling": "fp32"}
    sig = {n: ptrs.get(n, "*i32" if n.endswith("_ptr") else "i32") for n in names}
    sig.update({n: "constexpr" for n in const})
    # as launched: pointers on 16 bytes, the logits' row stride (E) a multiple of 16
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*") or n == "stride_lm"}
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})

def routing_layouts(ir, experts):
    layouts = dict(re.findall(r"^(#blocked\d*) = (.*)$", ir, re.M))
    load = re.search(rf"tt.load .*: tensor<{experts}x!tt.ptr<(?:bf16|f32)>, (#blocked\d*)>", ir).group(1)
    reduces = re.findall(rf'"tt.reduce"\(%\w+\) <\{{axis = 0 : i32\}}> .*?tensor<{experts}xf32, (#blocked\d*)>',
                         ir, re.S)
    return layouts[load], [layouts[r] for r in reduces[:3]]

# Qwen3-30B-A3B (bf16 router) and DeepSeek-V2-Lite (fp32 router) at their decode BLOCK_Ms
for logits, experts, top_k, renorm, block_m in (("*bf16", 128, 8, True, 16), ("*bf16", 128, 8, True, 32),
                                                ("*fp32", 64, 6, False, 16), ("*fp32", 64, 6, False, 64)):
    routing = dict(TOP_K=top_k, RENORMALIZE=renorm, COUNT=True, BLOCK_E=experts, BLOCK_K=8)
    out = compile(_route_align_kernel, logits, dict(routing, BLOCK_M=block_m, FILL=FILL, SCATTER=SCATTER))
    ptx = out.asm["ptx"]
    assert "atom.global.gpu.acq_rel.add" in ptx, "the ticket: an acq_rel atomic at GPU scope"
    assert "atom.global.gpu.relaxed.add" in ptx, "the ranks: relaxed atomics"
    assert "bar.sync" in ptx
    # the routing math gets the chain routing kernel's layouts: the same reductions, the same bits
    fused = routing_layouts(out.asm["ttgir"], experts)
    chain = routing_layouts(compile(_softmax_topk_kernel, logits, routing).asm["ttgir"], experts)
    assert fused == chain, (logits, experts, fused, chain)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for the real device")
def test_route_align_compiles_for_sm90():
    """Qwen3-30B-A3B's and DeepSeek-V2-Lite's specializations at their decode BLOCK_Ms: the ticket is an
    acq_rel atomic behind a CTA barrier, and the routing math gets the chain routing kernel's layouts."""
    assert_compiles_for_sm90(_COMPILE_SM90)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "experts,top_k,renormalize", [(128, 8, True), (64, 6, False)], ids=["qwen3", "v2-lite"]
)
@pytest.mark.parametrize("tokens", [2, 8, 64, 256, 512])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "bf16-ties"])
def test_route_and_align_matches_chain_gpu(experts, top_k, renormalize, tokens, ties):
    from meshserve.kernels.moe_configs import tuned_configs

    gen = torch.Generator(device="cuda").manual_seed(tokens)
    if ties:
        logits = torch.randn(tokens, experts, device="cuda", generator=gen).to(torch.bfloat16)
    else:
        logits = _distinct_logits(tokens, experts, gen)
    block_m = tuned_configs(tokens * top_k, experts).gate_up.BLOCK_M
    for _ in range(3):  # the workspace is reused launch after launch
        _check(logits, top_k, renormalize, 1.0, block_m)


@pytest.mark.gpu
def test_route_and_align_in_a_cuda_graph_gpu():
    """Replayed many times in a graph (the workspace's reset inside the launch is all that keeps it right)."""
    from meshserve.kernels import triton_moe_align
    from meshserve.kernels.triton_moe_route_align import route_and_align

    logits = torch.randn(256, 128, device="cuda").to(torch.bfloat16)
    route_and_align(logits, 8, True, 1.0, None, 32)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [route_and_align(logits, 8, True, 1.0, None, 32) for _ in range(4)]
    for _ in range(20):
        logits.copy_(torch.randn(256, 128, device="cuda").to(torch.bfloat16))
        graph.replay()
        for weights, ids, aligned in outs:
            assert_same_runs(aligned, triton_moe_align.align_by_expert(ids, 128, 32), 32, every_block=True)


@interp
@pytest.mark.slow  # the bench's table in the interpreter (~9 s): a tool check, the kernel has its own tests
def test_bench_moe_compares_chain_and_fused_route_align(monkeypatch):
    """tools/bench_moe.py's routing + align comparison runs (interpreter: timing and launch counts stubbed)
    and finds the fused outputs the chain's, for both models' routings."""
    import tools.bench_moe as bench

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "time_graph", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "count_launches", lambda fn: (fn(), -1)[1])
    for shape in bench.MODELS.values():
        chain, fused = bench.bench_route_align(shape, 9)
        assert chain["ok"] and fused["ok"] and (chain["path"], fused["path"]) == ("chain", "fused")
