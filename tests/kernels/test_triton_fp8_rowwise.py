"""The rowwise-scaled Triton fp8 GEMM (kernels/triton_fp8_rowwise.py, MESHSERVE_FP8_GEMM=triton) against the
reference products: tiles, split-K with its tickets, uneven K, bias; its tile rule; the sm_90 compile; on the GPU,
torch._scaled_mm at Llama-3.1-8B's projections."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.quant_ref import FP8_DTYPE
from tests.kernels.sm90 import assert_compiles_for_sm90

_HAS_CUDA = torch.cuda.is_available()
_HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not _HAS_TRITON, reason="triton not installed")
interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")

if _HAS_TRITON:
    from meshserve.kernels import triton_fp8_rowwise
    from meshserve.kernels.triton_fp8_rowwise import fp8_rowwise_gemm, rowwise_tile


def _operands(m, n, k, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    xq = (torch.randn(m, k, generator=g) * 40).clamp(-448, 448).to(FP8_DTYPE)
    wq = (torch.randn(n, k, generator=g) * 40).clamp(-448, 448).to(FP8_DTYPE)
    xs = torch.rand(m, 1, generator=g) * 0.01 + 1e-3
    ws = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    return [t.to(device) for t in (xq, wq, xs, ws, bias)]


def _reference(xq, wq, xs, ws, bias):
    y = (xq.double() @ wq.double().t()) * xs.double() * ws.double()[None, :]
    return y if bias is None else y + bias.double()


@needs_triton
@interp
@pytest.mark.parametrize("m, n, k", [(1, 48, 256), (5, 130, 256), (70, 48, 200)])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rowwise_gemm_equals_reference_interp(m, n, k, split, with_bias):
    xq, wq, xs, ws, bias = _operands(m, n, k, seed=m + n + k)
    bias = bias if with_bias else None
    # small tiles: several row and column tiles, K in 4-8 steps of 32 (200: the last one partial)
    got = fp8_rowwise_gemm(xq, xs, wq, ws, bias, torch.float32, tile=(16, 16, 32, split, 4, 1))
    torch.testing.assert_close(got.double(), _reference(xq, wq, xs, ws, bias), rtol=1e-5, atol=1e-5)
    if split > 1:  # every tile's ticket back at zero for the next launch
        assert not triton_fp8_rowwise._ticket_workspace(xq.device).any()


@needs_triton
@interp
def test_rowwise_gemm_default_tile_and_16_bit_output_interp():
    xq, wq, xs, ws, bias = _operands(20, 64, 512, seed=1)
    got = fp8_rowwise_gemm(xq, xs, wq, ws, None, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), _reference(xq, wq, xs, ws, None), rtol=1e-2, atol=1e-2)


@needs_triton
@interp
def test_fp8_rows_linear_takes_it_on_request_interp():
    """quant_ops.fp8_rows_linear(gemm="triton"), the projection the fp8 layers call on pre-quantized rows
    (MESHSERVE_FP8_GEMM=triton through layers/quantization/fp8.py): the reference products, bias included."""
    from meshserve.kernels.quant_ops import fp8_rows_linear

    xq, wq, xs, ws, bias = _operands(9, 40, 256, seed=9)
    got = fp8_rows_linear(xq, xs, wq, ws, bias, torch.float32, "triton")
    torch.testing.assert_close(got.double(), _reference(xq, wq, xs, ws, bias), rtol=1e-5, atol=1e-5)


@needs_triton
def test_tile_rule_splits_k_until_the_tiles_fill_a_wave():
    # Llama-3.1-8B at W2's batch on an H200 (132 SMs): down (N 4,096, K 14,336) has 64 tiles of 128 x 128:
    # split 2 (128 programs); gate_up (N 28,672) 448 tiles: none; qkv (6,144) 96 tiles: none (2 x 96 > 132)
    assert rowwise_tile(256, 4096, 14336, 132) == (128, 128, 128, 2, 8, 4)
    assert rowwise_tile(256, 28672, 4096, 132)[3] == 1
    assert rowwise_tile(256, 6144, 4096, 132)[3] == 1
    assert rowwise_tile(64, 4096, 4096, 132) == (64, 64, 128, 2, 4, 5)  # 64 tiles, 32 K tiles: 2 splits
    assert rowwise_tile(16, 64, 1024, 132)[3] == 1  # 8 K tiles: no room to split


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_fp8_rowwise import _fp8_rowwise_kernel

names = list(_fp8_rowwise_kernel.arg_names)
ptrs = dict(a_ptr="*fp8e4nv", as_ptr="*fp32", b_ptr="*fp8e4nv", bs_ptr="*fp32", bias_ptr="*bf16", c_ptr="*bf16",
            ws_ptr="*fp32", ticket_ptr="*i32")
for split, (bm, bn, warps, stages) in ((1, (128, 128, 8, 4)), (2, (128, 128, 8, 4)), (1, (64, 64, 4, 5))):
    const = dict(HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split, GROUP_M=8, EVEN_K=True)
    sig = {n: "constexpr" if n in const else ptrs.get(n, "i32") for n in names}
    div16 = [n for n in names if n not in const and (n.endswith("_ptr") or n.startswith("stride"))]
    src = ASTSource(_fp8_rowwise_kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div16})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": warps, "num_stages": stages}).asm["ptx"]
    # fp8 operands straight into Hopper's tensor cores; the split-K ticket only where K is split
    assert "wgmma" in ptx and "e4m3" in ptx and ("atom" in ptx) == (split > 1), (split, bm, bn)
print("compiled")
"""


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_rowwise_gemm_compiles_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 64, 256, 300])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])  # Llama-3.1-8B
def test_rowwise_gemm_equals_scaled_mm_gpu(m, n, k):
    xq, wq, xs, ws, _ = _operands(m, n, k, seed=m, device="cuda")
    got = fp8_rowwise_gemm(xq, xs, wq, ws, None, torch.bfloat16)
    want = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws[None, :], out_dtype=torch.bfloat16)
    # the same fp32 products summed in another order, then one bf16 rounding each
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)
