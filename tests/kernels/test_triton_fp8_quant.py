"""The one-pass FP8 activation quantization (kernels/triton_fp8_quant.py) against quant_ref: in the interpreter
without CUDA, bit for bit at Llama-3.1-8B and Qwen3-0.6B projection widths with `-m gpu`, and compiled for
sm_90 without a GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.quant_ref import (
    FP8_DTYPE,
    quantize_fp8_per_channel,
    quantize_fp8_per_token,
    to_fp8,
)
from tests.kernels.sm90 import assert_compiles_for_sm90
from tests.quant_fixtures import assert_fp8_linear_close, e4m3_exact

_HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")


def _rows_exact_after_scaling(m: int, k: int, seed: int) -> torch.Tensor:
    """Rows whose absmax is 3 and whose values divided by 3 / 448 are e4m3 numbers: nothing for the cast to
    round (the interpreter's fp32 -> fp8 cast mis-rounds values that round up to a power of two)."""
    g = torch.Generator().manual_seed(seed)
    x = e4m3_exact(torch.randn(m, k, generator=g) * 50, 3 / 448)
    x[:, k // 3] = -3.0
    return x


@needs_triton
@interp
@pytest.mark.parametrize("max_block", [None, 64])  # 64: the two-pass path (row longer than the block)
def test_per_token_matches_reference_interp(monkeypatch, max_block):
    from meshserve.kernels import triton_fp8_quant

    if max_block is not None:
        monkeypatch.setattr(triton_fp8_quant, "MAX_BLOCK", max_block)
    x = _rows_exact_after_scaling(5, 300, seed=1)
    x[3] = 0.0  # an all-zero row takes the minimum scale, not a division by zero
    q, s = triton_fp8_quant.quantize_fp8_per_token(x)  # fp32 rows (bf16 ones: the GPU test, bit for bit)
    rq, rs = quantize_fp8_per_token(x)
    assert q.dtype == FP8_DTYPE and s.shape == (5, 1)
    assert torch.equal(s, rs) and torch.equal(q.float(), rq.float())
    assert s[3].item() == pytest.approx(1e-12) and not q[3].float().any()


@needs_triton
@interp
def test_static_scale_saturates_like_to_fp8_interp():
    from meshserve.kernels.triton_fp8_quant import quantize_fp8_static

    x = _rows_exact_after_scaling(3, 130, seed=2) * 4  # absmax 12 / scale 0.02 = 600: past 448, saturates
    scale = torch.tensor(0.02 * 1.0)
    q = quantize_fp8_static(x, scale)
    ref = to_fp8(x, scale)
    assert torch.equal(q.float(), ref.float()) and q.float().abs().max() == 448


@needs_triton
@interp
def test_strided_rows_and_empty_batch_interp():
    from meshserve.kernels.triton_fp8_quant import quantize_fp8_per_token as fast

    x = _rows_exact_after_scaling(4, 96, seed=3)
    view = x[:, :48]  # row stride 96: read in place, no copy
    q, s = fast(view)
    rq, rs = quantize_fp8_per_token(view)
    assert torch.equal(q.float(), rq.float()) and torch.equal(s, rs)
    q0, s0 = fast(x[:0])
    assert q0.shape == (0, 96) and s0.shape == (0, 1)


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_fp8_quant import _quantize_fp8_rows_kernel as kernel

names = list(kernel.arg_names)
for static, block, one_pass in [(False, 4096, True), (False, 16384, True), (True, 4096, True),
                                (False, 16384, False)]:
    sig = {n: "i32" for n in names}
    sig.update(x_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32", min_scale="fp32")
    const = dict(FP8_MAX=448.0, STATIC=static, BLOCK=block, ONE_PASS=one_pass, USE_GDC=False)
    sig.update({n: "constexpr" for n in const})
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16, "num_stages": 1})
    assert "cvt.rn.satfinite.e4m3x2.f32" in k.asm["ptx"]  # the round-to-nearest-even fp8 cast
    assert "div.rn.f32" in k.asm["ptx"]  # IEEE division, as torch's
print("compiled")
"""


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernel for the real device")
def test_kernel_compiles_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


# Llama-3.1-8B (qkv/o/gate_up in 4096, down in 14336) and Qwen3-0.6B (1024, o in 2048, down in 3072)
_WIDTHS = [4096, 14336, 1024, 2048, 3072, 20000]  # 20000: past MAX_BLOCK, the two-pass path


@pytest.mark.gpu
@pytest.mark.parametrize("k", _WIDTHS)
@pytest.mark.parametrize("m", [2, 256])
def test_per_token_bitwise_gpu(m, k):
    from meshserve.kernels.triton_fp8_quant import quantize_fp8_per_token as fast

    g = torch.Generator(device="cuda").manual_seed(k + m)
    x = (torch.randn(m, k, device="cuda", generator=g) * 3).to(torch.bfloat16)
    x[0, 7] = 80.0  # one outlier per row 0: most of its values land near zero
    q, s = fast(x)
    # torch on CUDA divides by the Python scalar 448 as a multiply by its fp32 reciprocal (1 ulp off IEEE,
    # which the kernel and CPU torch use); given the scales, the cast is bit for bit
    torch.testing.assert_close(s, quantize_fp8_per_token(x)[1], rtol=2.4e-7, atol=0)
    assert torch.equal(q.view(torch.uint8), to_fp8(x, s).view(torch.uint8))
    assert torch.equal(s, (x.float().abs().amax(1, keepdim=True).cpu() / 448.0).clamp(min=1e-12).cuda())
    scale = torch.tensor(0.01, device="cuda")
    from meshserve.kernels.triton_fp8_quant import quantize_fp8_static

    assert torch.equal(quantize_fp8_static(x, scale).view(torch.uint8), to_fp8(x, scale).view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("kn", [(4096, 6144), (14336, 4096), (1024, 4096), (3072, 1024)])
def test_fp8_linear_batch_256_gpu(kn):
    """The layer's dispatch at decode batch 256 (Triton quantization + _scaled_mm) against the reference."""
    from meshserve.kernels.quant_ops import fp8_linear

    k, n = kn
    wq, ws = quantize_fp8_per_channel(torch.randn(n, k, device="cuda") * 0.02)
    x = torch.randn(256, k, device="cuda", dtype=torch.bfloat16)
    out = fp8_linear(x, wq, ws, None, None, gemv=True)  # the switch on: the Triton quantization
    assert_fp8_linear_close(out, x, wq, ws)
    static = torch.tensor(0.02, device="cuda")
    out = fp8_linear(x, wq, ws, static, None, gemv=True)
    assert_fp8_linear_close(out, x, wq, ws, static)
