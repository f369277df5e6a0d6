"""triton_skinny_gemv.skinny_gemv (2-16 rows, each weight tile loaded once for all of them) vs F.linear.

Without CUDA the kernel runs in the Triton CPU interpreter in fp32 and fp16; a subprocess also compiles it to
sm_90 code with Triton's bundled ptxas (tl.dot's layouts, the split-K store, and that the weight loads are
software-pipelined: cp.async in flight), which the interpreter does not check. GPU tests (-m gpu) take
Llama-3.1-8B's and Qwen3-0.6B's shapes in bf16 and fp16.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.kernels.sm90 import assert_compiles_for_sm90

_HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")
gpu = pytest.mark.gpu


def _inputs(device, dtype, m, n, k, with_bias, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=device).to(dtype)
    weight = (0.05 * torch.randn(n, k, generator=g, device=device)).to(dtype)
    bias = torch.randn(n, generator=g, device=device).to(dtype) if with_bias else None
    return x, weight, bias


def _check(device, dtype, m, n, k, with_bias=False, tiles=None):
    from meshserve.kernels.triton_skinny_gemv import skinny_gemv, skinny_gemv_ref

    x, weight, bias = _inputs(device, dtype, m, n, k, with_bias)
    y = skinny_gemv(x, weight, bias, tiles=tiles)
    ref = skinny_gemv_ref(x.float(), weight.float(), None if bias is None else bias.float())
    assert y.shape == (m, n) and y.dtype == dtype
    # fp32 sums in another order, then one rounding to the output dtype
    tol = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
    return y


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k", [(2, 37, 300), (5, 64, 1024), (16, 20, 513)])
def test_skinny_gemv_interp(dtype, m, n, k):
    # partial row blocks (37, 20 outputs), a K not a multiple of the tile (300, 513), every row count's edge
    _check("cpu", dtype, m, n, k, with_bias=n == 37)


@interp
@pytest.mark.parametrize("with_bias", [False, True])
def test_split_k_sums_partials_and_adds_the_bias_once(with_bias):
    from meshserve.kernels.triton_skinny_gemv import SkinnyTiles

    # 3 splits of 1,000 columns in 256-column steps: the last split is short and its last step partial
    tiles = SkinnyTiles(block_n=16, block_k=256, split_k=3, num_warps=4, num_stages=2)
    _check("cpu", torch.float32, 5, 40, 1000, with_bias=with_bias, tiles=tiles)


@interp
def test_leading_dims_and_strided_rows():
    from meshserve.kernels.triton_skinny_gemv import skinny_gemv

    x, weight, _ = _inputs("cpu", torch.float32, 6, 24, 256, False)
    y = skinny_gemv(x.view(2, 3, 256), weight)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y.view(6, 24), x @ weight.T, atol=1e-4, rtol=1e-4)
    wide = torch.randn(4, 512)
    torch.testing.assert_close(skinny_gemv(wide[:, :256], weight), wide[:, :256] @ weight.T, atol=1e-4, rtol=1e-4)


@interp
def test_skinny_gemv_rejects_what_it_cannot_serve():
    from meshserve.kernels.triton_skinny_gemv import MAX_ROWS, skinny_gemv

    x, weight, _ = _inputs("cpu", torch.float32, MAX_ROWS + 1, 8, 64, False)
    with pytest.raises(ValueError, match="rows"):
        skinny_gemv(x, weight)
    with pytest.raises(ValueError, match="rows"):
        skinny_gemv(x[:2, :32], weight)
    with pytest.raises(ValueError, match="one dtype"):
        skinny_gemv(x[:2], weight.half())


def test_tiles_split_k_only_for_projections_that_leave_sms_idle():
    from meshserve.kernels.triton_skinny_gemv import skinny_tiles

    # Llama-3.1-8B on 132 SMs: every projection has >= 256 row blocks of 16: no split
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)):
        assert skinny_tiles(n, k, 132).split_k == 1
    # Qwen3-0.6B's o_proj (1,024 outputs: 64 blocks) splits K (2,048) in 2: 128 programs, each >= 4 K steps
    t = skinny_tiles(1024, 2048, 132)
    assert t.split_k == 2
    assert skinny_tiles(1024, 3072, 132).split_k == 2  # down_proj: a 4th split would leave < 4 steps each
    assert skinny_tiles(16, 512, 132).split_k == 1  # too short to split


def test_dispatch_takes_a_few_16_bit_gpu_rows_only(monkeypatch):
    from meshserve.kernels import fused

    x = torch.zeros(5, 64, dtype=torch.bfloat16)
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert fused.skinny_gemv_for(x, w, enabled=True) is None  # a CPU tensor: F.linear
    # what the call alone decides, on a tensor that claims to be on a GPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    mod = fused._triton_skinny_gemv()
    assert fused.skinny_gemv_for(x, w, enabled=True) is mod
    assert fused.skinny_gemv_for(x, w, enabled=False) is None
    assert fused.skinny_gemv_for(x[:1], w, enabled=True) is None  # one row: the batch-1 GEMV's
    assert fused.skinny_gemv_for(torch.zeros(17, 64, dtype=torch.bfloat16), w, enabled=True) is None
    assert fused.skinny_gemv_for(x.float(), w.float(), enabled=True) is None  # fp32 stays exact on cuBLAS


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_skinny_gemv import _skinny_gemv_kernel, skinny_tiles

def compile(pointers, out, const, warps=4):
    names = list(_skinny_gemv_kernel.arg_names)
    sig = {n: "i32" for n in names}
    sig.update({n: pointers for n in ("x_ptr", "w_ptr", "b_ptr")})
    sig["y_ptr"] = out
    sig.update({n: "constexpr" for n in const})
    # what a launch specialises on for 8B's shapes: 16-aligned pointers, sizes and strides
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in
             ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "N", "K", "stride_xm", "stride_w", "stride_ym", "k_per_split")}
    src = ASTSource(_skinny_gemv_kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs=attrs)
    options = {"num_warps": warps, "num_stages": 4}
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    # tensor-core products, and the weight stream software-pipelined (async copies in flight)
    assert "mma.sync" in ptx and "cp.async" in ptx, "no mma or no pipelined loads"
    return ptx.count("mma.sync")

# bf16 with a bias in the default tiles (one launch), fp16 split over K (fp32 partials)
t = skinny_tiles(4096, 4096, 132)
per_warp = compile("*bf16", "*bf16", dict(HAS_BIAS=True, BLOCK_M=16, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                                          SPLIT_K=1), t.num_warps)
# the loop body's m16n8k16 products (once in the PTX), over the warps: each product once, none repeated
needed = (t.block_n // 8) * (t.block_k // 16)
assert per_warp * t.num_warps == needed, f"{per_warp} mma a warp x {t.num_warps} warps != {needed}"
compile("*fp16", "*fp32", dict(HAS_BIAS=False, BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, SPLIT_K=2))
print("compiled")
"""


@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernel for the real device")
def test_kernel_compiles_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


# ----------------------------------------------------------------------------------------------------------
# GPU tests (-m gpu): Llama-3.1-8B's projections and LM head, Qwen3-0.6B's (split K), a verify step's rows
# ----------------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096),
                                 (1024, 2048), (1024, 3072), (1027, 4000)])
@pytest.mark.parametrize("m", [2, 5, 9, 16])
def test_skinny_gemv_gpu(dtype, n, k, m):
    _check("cuda", dtype, m, n, k, with_bias=n == 1027)


@gpu
def test_linear_takes_the_skinny_gemv_where_enabled():
    from meshserve.kernels.fused import linear

    x, weight, bias = _inputs("cuda", torch.bfloat16, 5, 4096, 4096, True)
    fast, plain = linear(x, weight, bias, skinny=True), linear(x, weight, bias)
    torch.testing.assert_close(fast.float(), plain.float(), atol=2e-2 * plain.abs().max().item(), rtol=2e-2)
