"""RMSNorm / SiLU-and-mul fused with the per-token fp8 quantization (kernels/triton_fp8_fused.py): against the
torch compositions in the interpreter, bit for bit against the unfused Triton pair on a GPU (`-m gpu`, Llama-3.1-8B
and Qwen3-0.6B widths), compiled for sm_90 without a GPU, and the layers' dispatch to them."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.kernels.sm90 import assert_compiles_for_sm90

_HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")


def _assert_quantized_close(got, ref):
    """(fp8 rows, scales) equal up to the interpreter's last-bit effects: scales within a few ulps, fp8 values
    within one e4m3 step, except where the interpreter's cast lands a binade low (tests/quant_fixtures.py)."""
    (q, s), (rq, rs) = got, ref
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=0)
    g, r = q.float(), rq.float()
    differ = q.view(torch.uint8) != rq.view(torch.uint8)
    one_step = (g - r).abs() <= r.abs() / 8
    binade_low = (torch.log2(r.abs()).frac() == 0) & (g == r / 2)
    assert differ.float().mean() < 0.05 and not (differ & ~one_step & ~binade_low).any()
    assert q.float().abs().max() == 448  # each row's absmax maps to 448


@interp
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_quant_matches_reference_interp(with_residual):
    from meshserve.kernels.triton_fp8_fused import rms_norm_quant_fp8, rms_norm_quant_fp8_ref

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=g, dtype=torch.float16)
    res = torch.randn(5, 96, generator=g, dtype=torch.float16) if with_residual else None
    w = (1 + 0.2 * torch.randn(96, generator=g)).to(torch.float16)
    got, summed = rms_norm_quant_fp8(x, w, 1e-6, res)
    ref, ref_summed = rms_norm_quant_fp8_ref(x, w, 1e-6, res)
    _assert_quantized_close(got, ref)
    if with_residual:
        assert torch.equal(summed, ref_summed)
    else:
        assert summed is None


@interp
def test_silu_and_mul_quant_matches_reference_interp():
    from meshserve.kernels.triton_fp8_fused import silu_and_mul_quant_fp8, silu_and_mul_quant_fp8_ref

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 2 * 80, generator=g) * 3).to(torch.float16)
    _assert_quantized_close(silu_and_mul_quant_fp8(x), silu_and_mul_quant_fp8_ref(x))


def test_layers_decline_where_the_fused_kernels_do_not_apply():
    """CPU rows, 16-bit weights, and one row keep the unfused paths (None: the caller's two-module path)."""
    from meshserve.kernels.fused import fp8_fused_for
    from meshserve.kernels.triton_fp8_fused import MAX_COLS

    x = torch.randn(4, 64)
    assert fp8_fused_for(x, 64) is None  # not on a GPU
    if _HAS_CUDA:
        assert fp8_fused_for(x.cuda(), MAX_COLS + 1) is None  # wider than a row in registers


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_fp8_fused import _rms_norm_quant_kernel, _silu_and_mul_quant_kernel

def compile90(kernel, ptrs, floats, const, warps):
    names = list(kernel.arg_names)
    sig = {n: "constexpr" if n in const else ptrs.get(n, "fp32" if n in floats else "i32") for n in names}
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "div.rn.f32" in ptx

for block, warps, residual in ((4096, 4, True), (1024, 4, True), (4096, 4, False)):  # False: the first layer
    compile90(_rms_norm_quant_kernel, dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16", q_ptr="*fp8e4nv",
              s_ptr="*fp32", res_out_ptr="*bf16"), ("eps", "min_scale"),
              dict(FP8_MAX=448.0, HAS_RESIDUAL=residual, BLOCK=block, USE_GDC=False), warps)
for block, warps in ((16384, 16), (4096, 4)):
    compile90(_silu_and_mul_quant_kernel, dict(x_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32"), ("min_scale",),
              dict(FP8_MAX=448.0, BLOCK=block, USE_GDC=False), warps)
print("compiled")
"""


@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_kernels_compile_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden,inter", [(4096, 14336), (1024, 3072)])  # Llama-3.1-8B, Qwen3-0.6B
@pytest.mark.parametrize("rows", [2, 256])
def test_fused_equal_the_unfused_triton_pair_gpu(hidden, inter, rows):
    from meshserve.kernels.triton_fp8_fused import rms_norm_quant_fp8, silu_and_mul_quant_fp8
    from meshserve.kernels.triton_fp8_quant import quantize_fp8_per_token
    from meshserve.kernels.triton_ops import rms_norm, silu_and_mul

    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, hidden, device="cuda", generator=g).to(torch.bfloat16)
    res = torch.randn(rows, hidden, device="cuda", generator=g).to(torch.bfloat16)
    w = (1 + 0.2 * torch.randn(hidden, device="cuda", generator=g)).to(torch.bfloat16)
    (q, s), summed = rms_norm_quant_fp8(x, w, 1e-6, res)
    normed, ref_summed = rms_norm(x, w, 1e-6, res)
    rq, rs = quantize_fp8_per_token(normed)
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(summed, ref_summed)
    gate_up = (torch.randn(rows, 2 * inter, device="cuda", generator=g) * 2).to(torch.bfloat16)
    q, s = silu_and_mul_quant_fp8(gate_up)
    rq, rs = quantize_fp8_per_token(silu_and_mul(gate_up))
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.gpu
def test_decoder_layer_takes_the_fused_fp8_path_gpu():
    """Llama-3.1-8B's MLP block with fp8 weights at batch 256: norm_linear and the down projection go through
    the fused kernels and give the unfused path's output."""
    from meshserve.layers.backend_selection import KernelSelection
    from meshserve.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    from meshserve.layers.norm import RMSNorm
    from meshserve.layers.norm_linear import norm_linear
    from meshserve.layers.quantization import Fp8Config, quantization_scope

    sel = KernelSelection(attention_backend="triton", fused_ops=True, gemv=True, kv_cache_dtype=torch.bfloat16)
    with torch.device("cuda"), quantization_scope(Fp8Config()):
        gate_up = MergedColumnParallelLinear(4096, [14336, 14336], bias=False).to(torch.bfloat16)
        down = RowParallelLinear(14336, 4096, bias=False).to(torch.bfloat16)
    norm = RMSNorm(4096).to("cuda", torch.bfloat16)
    for layer in (gate_up, down, norm):
        layer.kernels = sel
    for layer in (gate_up, down):
        layer.weight.data.normal_(0, 0.02)
        layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    fused_gu, summed = norm_linear(norm, gate_up, x, res)
    normed, ref_summed = norm(x, res)
    assert torch.equal(summed, ref_summed)
    torch.testing.assert_close(fused_gu, gate_up(normed), atol=0, rtol=0)  # the same fp8 rows and GEMM
    out = down.fused_gated_forward(fused_gu)
    from meshserve.layers.activation import SiluAndMul

    act = SiluAndMul()
    act.kernels = sel
    torch.testing.assert_close(out, down(act(fused_gu)), atol=0, rtol=0)
