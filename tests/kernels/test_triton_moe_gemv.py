"""The small-batch MoE GEMV (kernels/triton_moe_gemv.py) against the torch reference (kernels/moe_ref.py):
in Triton's interpreter at tiny shapes without a GPU (fp32 tight, fp16 within its rounding), compiled for
sm_90, and on a GPU at Qwen3-30B-A3B's and DeepSeek-V2-Lite's expert shapes, inside a CUDA graph."""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from meshserve.kernels.moe_ref import fused_experts_ref
from tests.kernels.sm90 import assert_compiles_for_sm90
from tests.kernels.test_triton_moe import _case

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
interp = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run only without CUDA")

# Qwen3-30B-A3B and DeepSeek-V2-Lite at TP 1: (experts, top_k, hidden, width)
MODEL_SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "deepseek-v2-lite": (64, 6, 2048, 1408)}


@interp
@pytest.mark.parametrize(
    "tokens,experts,top_k,drop,tiles",
    [(1, 8, 2, False, "multi-k"), (3, 16, 4, True, "default")],
    ids=["batch1-multi-k", "batch3-ep-half"],
)
def test_moe_gemv_matches_reference_fp32(tokens, experts, top_k, drop, tiles):
    """Widths that are no multiple of the tiles (48 of 4-row tiles, K tiles of 32 over 64 and 48 features:
    several K steps, a masked tail), ids of -1 skipped."""
    from meshserve.kernels.triton_moe_gemv import MoeGemvConfig, moe_gemv

    x, w13, w2, weights, ids = _case(tokens, experts, top_k, 64, 48, torch.float32, "cpu", drop)
    cfg = MoeGemvConfig(4, 32, 8, 32, 4) if tiles == "multi-k" else None
    got = moe_gemv(x, w13, w2, weights, ids, cfg)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, fused_experts_ref(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


@interp
def test_moe_gemv_rounds_as_the_reference_fp16():
    """fp16: gate, up, silu, the product and each slot's output rounded to fp16 as the reference rounds them;
    only the fp32 summation order differs (a few ulps, far below a missed rounding step)."""
    from meshserve.kernels.triton_moe_gemv import moe_gemv

    x, w13, w2, weights, ids = _case(2, 8, 2, 64, 48, torch.float16, "cpu")
    got = moe_gemv(x, w13, w2, weights, ids)
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(got.float(), ref.float(), atol=4e-3, rtol=4e-3)


@interp
def test_moe_gemv_skips_every_pair_of_other_ranks():
    """A token whose experts all live elsewhere gets zeros (no stale buffer contents)."""
    from meshserve.kernels.triton_moe_gemv import moe_gemv

    x, w13, w2, weights, ids = _case(2, 8, 2, 64, 48, torch.float32, "cpu")
    ids[1] = -1
    got = moe_gemv(x, w13, w2, weights, ids)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    torch.testing.assert_close(got, fused_experts_ref(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


@interp
def test_prefetched_gate_up_gives_the_same_bits(monkeypatch):
    """MESHSERVE_GEMV_PREFETCH=moe loads gate_up's next K tile a trip earlier: the same sums in the same order
    (several K tiles, a masked tail over 48 features)."""
    from meshserve.kernels.triton_moe_gemv import MoeGemvConfig, moe_gemv

    x, w13, w2, weights, ids = _case(2, 8, 2, 80, 48, torch.float32, "cpu", drop=True)
    cfg = MoeGemvConfig(4, 32, 8, 32, 4)
    runs = {}
    for value in ("0", "moe"):
        monkeypatch.setenv("MESHSERVE_GEMV_PREFETCH", value)
        runs[value] = moe_gemv(x, w13, w2, weights, ids, cfg)
    assert torch.equal(runs["0"], runs["moe"])


@interp
@pytest.mark.parametrize("moe", ["preload", "launch"])
def test_moe_gemv_under_the_pdl_switch_matches_reference_fp32(moe):
    """With the PDL switch on, the down launch preloads its experts' tiles (all slots in one [S, N, K] tile; the
    interpreter runs that layout, with no griddepcontrol): the reference's sums, ids of -1 adding nothing, a
    top-k that is no power of two (3 slots padded to 4)."""
    from meshserve.kernels import pdl
    from meshserve.kernels.triton_moe_gemv import MoeGemvConfig, moe_gemv

    x, w13, w2, weights, ids = _case(3, 16, 3, 64, 48, torch.float32, "cpu", drop=True)
    ids[2] = -1
    cfg = MoeGemvConfig(4, 32, 2, 64, 4)  # one 64-wide down tile over the 48 features: the preload's case
    with pdl.enabled(True, moe=moe):
        got = moe_gemv(x, w13, w2, weights, ids, cfg)
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    torch.testing.assert_close(got, fused_experts_ref(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


@interp
# the shared slices are one code path under any tiles (the tiles themselves: test_moe_gemv_matches_reference_fp32);
# several K steps by default, the default tiles too with -m slow (~4 s of interpreter each)
@pytest.mark.parametrize("tiles", ["multi-k", pytest.param("default", marks=pytest.mark.slow)])
def test_moe_gemv_adds_a_shared_mlp_as_slices_of_weight_one(tiles):
    """A shared MLP two experts wide (DeepSeek's n_shared_experts = 2) in the same launches: the reference's
    routed sum plus the shared MLP, with ids of -1 among the routed slots."""
    from meshserve.kernels.triton_moe_gemv import MoeGemvConfig, moe_gemv

    x, w13, w2, weights, ids = _case(3, 16, 4, 64, 48, torch.float32, "cpu", drop=True)
    gen = torch.Generator().manual_seed(7)
    shared_w13 = torch.randn(2 * 96, 64, generator=gen) / 8
    shared_w2 = torch.randn(64, 96, generator=gen) / 96**0.5
    cfg = MoeGemvConfig(4, 32, 8, 32, 4) if tiles == "multi-k" else None
    got = moe_gemv(x, w13, w2, weights, ids, cfg, shared_w13=shared_w13, shared_w2=shared_w2)
    ref = fused_experts_ref(x, w13, w2, weights, ids, shared_w13=shared_w13, shared_w2=shared_w2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # and the reference's shared part is the plain MLP: down(silu(gate(x)) * up(x))
    gate, up = torch.nn.functional.linear(x, shared_w13).chunk(2, dim=-1)
    mlp = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, shared_w2)
    torch.testing.assert_close(ref - fused_experts_ref(x, w13, w2, weights, ids), mlp, atol=1e-5, rtol=1e-5)


def test_gemv_serves_one_token_only():
    """The GEMV reads an expert once per pair: measured slower than the grouped GEMM from 8 tokens on, and
    repeats are likely from 2 tokens on, so it takes batch-1 calls only (Qwen3-30B-A3B, V2-Lite, Mixtral)."""
    from meshserve.kernels.moe import gemv_serves as serves

    for experts, top_k in ((128, 8), (64, 6), (8, 2)):
        assert serves(1, top_k, experts)
        assert not any(serves(n, n * top_k, experts) for n in (2, 4, 8, 64))


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_moe_gemv import _down_sum_gemv_kernel, _gate_up_gemv_kernel, default_config
from meshserve.kernels.triton_moe_routing import _softmax_topk_kernel
from meshserve.kernels.triton_moe import _combine_kernel
from meshserve.kernels.triton_moe_align import _count_kernel, _plan_kernel, _scatter_kernel

def compile(kernel, sig, const, warps):
    names = list(kernel.arg_names)
    full = {n: "fp32" if n == "scaling" else "i32" for n in names}
    full.update(sig)
    full.update({n: "constexpr" for n in const})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if full[n].startswith("*")}
    src = ASTSource(kernel, full, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3})

for experts, top_k, hidden, width in ((128, 8, 2048, 768), (64, 6, 2048, 1408)):
    cfg = default_config(hidden, width)
    shared = 2 if top_k == 6 else 0  # DeepSeek-V2-Lite's two shared experts ride along
    one_tile = cfg.down_block_k >= width
    for gdc in (False, 1):  # plain, and PDL (the down launch's preloaded tiles where moe_gemv takes them)
        compile(_gate_up_gemv_kernel, {"x_ptr": "*bf16", "w13_ptr": "*bf16", "shared_w13_ptr": "*bf16",
                                       "ids_ptr": "*i32", "inter_ptr": "*bf16"},
                {"TOP_K": top_k, "NUM_SHARED": shared, "BLOCK_N": cfg.gate_up_block_n,
                 "BLOCK_K": cfg.gate_up_block_k, "PREFETCH": bool(gdc), "USE_GDC": gdc}, cfg.num_warps)
        compile(_down_sum_gemv_kernel, {"inter_ptr": "*bf16", "w2_ptr": "*bf16", "shared_w2_ptr": "*bf16",
                                        "ids_ptr": "*i32", "weights_ptr": "*fp32", "out_ptr": "*bf16"},
                {"TOP_K": top_k, "NUM_SHARED": shared, "BLOCK_N": cfg.down_block_n, "BLOCK_K": cfg.down_block_k,
                 "ONE_TILE": one_tile, "PRELOAD": bool(gdc) and one_tile and not shared,
                 "SLOTS": triton.next_power_of_2(top_k), "USE_GDC": gdc}, cfg.num_warps)
        # the routing launch before them (kernels/triton_moe_routing.py)
        compile(_softmax_topk_kernel, {"logits_ptr": "*bf16", "weights_ptr": "*fp32", "ids_ptr": "*i32",
                                       "load_ptr": "*i64"},
                {"TOP_K": top_k, "RENORMALIZE": top_k == 8, "COUNT": True, "BLOCK_E": experts,
                 "BLOCK_K": triton.next_power_of_2(top_k), "USE_GDC": gdc}, 1)
# the grouped path's align (triton_moe_align) and combine (triton_moe) launches
ptrs = {n: "*i32" for n in ("ids_ptr", "counts_ptr", "cursor_ptr", "sorted_rows_ptr", "block_expert_ptr",
                            "num_padded_ptr")}
for kernel in (_count_kernel, _scatter_kernel):
    compile(kernel, {n: t for n, t in ptrs.items() if n in kernel.arg_names}, {"CHUNK": 64, "BLOCK_E": 128}, 4)
compile(_plan_kernel, {n: t for n, t in ptrs.items() if n in _plan_kernel.arg_names},
        {"BLOCK_M": 32, "BLOCK_E": 128, "FILL": 64, "FILL_ROWS": 1024}, 4)
compile(_combine_kernel, {"pairs_ptr": "*bf16", "ids_ptr": "*i32", "out_ptr": "*bf16"}, {"TOP_K": 8, "BLOCK_H": 1024}, 4)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for the real device")
def test_moe_path_kernels_compile_for_sm90_without_gpu():
    """The new MoE path's small kernels: routing, the GEMV's gate_up and down, the grouped path's align and
    combine (its tuned GEMM configs: test_triton_moe_align.py, slow)."""
    assert_compiles_for_sm90(_COMPILE_SM90)


@functools.cache
def model_experts(model: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 experts at a model's shapes, drawn on the GPU once per model (the CPU draw takes seconds)."""
    experts, _, hidden, width = MODEL_SHAPES[model]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(experts, 2 * width, hidden, device="cuda", generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, width, device="cuda", generator=gen) / width**0.5
    return w13.bfloat16(), w2.bfloat16()


def model_batch(model: str, tokens: int, seed: int):
    """x [tokens, hidden] bf16 and its routing (weights, ids) at a model's shapes, on the GPU."""
    from meshserve.layers.moe_routing import SoftmaxTopK

    experts, top_k, hidden, _ = MODEL_SHAPES[model]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
    weights, ids = SoftmaxTopK(top_k, renormalize=True)(
        torch.randn(tokens, experts, device="cuda", generator=gen)
    )
    return x, weights, ids


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 2, 8])
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_moe_gemv_matches_reference_at_model_shapes_in_a_cuda_graph(tokens, model):
    """bf16 at the models' expert shapes, captured and replayed in a CUDA graph with new routing in place."""
    from meshserve.kernels.triton_moe_gemv import moe_gemv

    w13, w2 = model_experts(model)
    x, weights, ids = model_batch(model, tokens, 0)
    moe_gemv(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_gemv(x, w13, w2, weights, ids)
    for seed in (1, 2):
        for buffer, new in zip((x, weights, ids), model_batch(model, tokens, seed), strict=True):
            buffer.copy_(new)
        graph.replay()
        ref = fused_experts_ref(x, w13, w2, weights, ids)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8])
def test_moe_gemv_with_deepseek_shared_experts_gpu(tokens):
    """DeepSeek-V2-Lite's two shared experts (one 2,816-wide MLP) folded into the GEMV launches."""
    from meshserve.kernels.triton_moe_gemv import moe_gemv

    w13, w2 = model_experts("deepseek-v2-lite")
    x, weights, ids = model_batch("deepseek-v2-lite", tokens, 3)
    gen = torch.Generator(device="cuda").manual_seed(5)
    shared_w13 = (torch.randn(2 * 2816, 2048, device="cuda", generator=gen) / 2048**0.5).bfloat16()
    shared_w2 = (torch.randn(2048, 2816, device="cuda", generator=gen) / 2816**0.5).bfloat16()
    got = moe_gemv(x, w13, w2, weights, ids, shared_w13=shared_w13, shared_w2=shared_w2)
    ref = fused_experts_ref(x, w13, w2, weights, ids, shared_w13=shared_w13, shared_w2=shared_w2)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("moe", ["preload", "launch"])
def test_moe_chain_under_pdl_matches_its_routing_eager_and_in_a_cuda_graph(moe):
    """router GEMV -> softmax top-k -> gate_up -> down at Qwen3-30B-A3B's shapes, one token, every launch with
    PDL (each one's input the one before's output: what a PDL race would corrupt, the down launch reading the
    routing's ids before its wait under "preload"), eagerly and replayed in a CUDA graph with new tokens in
    place: the output is the reference's for the routing the chain itself picked, and that routing is the
    plain launches' wherever the logits are."""
    from meshserve.kernels import pdl
    from meshserve.kernels.triton_gemv import gemv
    from meshserve.kernels.triton_moe_gemv import moe_gemv
    from meshserve.kernels.triton_moe_routing import softmax_topk

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm_90 or newer")
    w13, w2 = model_experts("qwen3-30b-a3b")
    gen = torch.Generator(device="cuda").manual_seed(11)
    router = (4 * torch.randn(128, 2048, device="cuda", generator=gen) / 2048**0.5).bfloat16()
    x = torch.randn(1, 2048, device="cuda", generator=gen).bfloat16()

    def chain(on: bool):
        with pdl.enabled(on, moe=moe):
            logits = gemv(x, router)
            weights, ids = softmax_topk(logits, 8, True)
            return logits, weights, ids, moe_gemv(x, w13, w2, weights, ids)

    def check(logits, weights, ids, out):
        ref_logits, ref_weights, ref_ids, _ = chain(False)
        if torch.equal(logits, ref_logits):
            assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)
        ref = fused_experts_ref(x, w13, w2, weights, ids)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)

    check(*chain(True))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain(True)
    for seed in (1, 2):
        x.copy_(torch.randn(1, 2048, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        check(*captured)


def test_tile_from_the_environment(monkeypatch):
    from meshserve.kernels.triton_moe_gemv import MoeGemvConfig, default_config

    assert default_config(2048, 768) == MoeGemvConfig(4, 256, 1, 1024, 4)  # Qwen3-30B-A3B's experts
    assert default_config(2048, 1408) == MoeGemvConfig(4, 512, 4, 512, 8)  # DeepSeek-V2-Lite's
    monkeypatch.setenv("MESHSERVE_MOE_GEMV_TILE", "4,256,4,512,4")
    assert default_config(2048, 768) == MoeGemvConfig(4, 256, 4, 512, 4)
    monkeypatch.setenv("MESHSERVE_MOE_GEMV_TILE", "4,256,4,1024,4,0")
    assert default_config(2048, 768) == MoeGemvConfig(4, 256, 4, 1024, 4, False)
    monkeypatch.setenv("MESHSERVE_MOE_GEMV_TILE", "4,256")
    with pytest.raises(ValueError, match="gate_up_n,gate_up_k,down_n,down_k,warps"):
        default_config(2048, 768)
