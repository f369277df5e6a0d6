"""The Triton decode GEMMs (kernels/triton_decode_gemm.py): the rowwise-scaled fp8 one (MESHSERVE_FP8_GEMM=triton)
and the 16-bit one (MESHSERVE_DECODE_GEMM=1) against the reference products: tiles, split-K with its tickets,
uneven K, bias; the tile rule; the routing; the sm_90 compile; on the GPU, torch._scaled_mm and F.linear at the
models' projections."""

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
    from meshserve.kernels.tickets import ticket_workspace
    from meshserve.kernels.triton_decode_gemm import decode_tile, fp8_rowwise_gemm, gemm_16bit


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
        assert not ticket_workspace(xq.device).any()


@needs_triton
@interp
def test_rowwise_gemm_default_tile_and_16_bit_output_interp():
    xq, wq, xs, ws, bias = _operands(20, 64, 512, seed=1)
    got = fp8_rowwise_gemm(xq, xs, wq, ws, None, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), _reference(xq, wq, xs, ws, None), rtol=1e-2, atol=1e-2)


def test_auto_takes_the_triton_gemm_for_few_rows_on_a_gpu():
    from meshserve.kernels.quant_ops import FP8_TRITON_MAX_ROWS, fp8_gemm_takes_triton

    assert fp8_gemm_takes_triton("auto", 2, True) and fp8_gemm_takes_triton("auto", FP8_TRITON_MAX_ROWS, True)
    assert not fp8_gemm_takes_triton("auto", FP8_TRITON_MAX_ROWS + 1, True)  # _scaled_mm led from 128 rows
    assert not fp8_gemm_takes_triton("auto", 2, False)  # off the GPU: the plain path
    assert fp8_gemm_takes_triton("triton", 512, True) and not fp8_gemm_takes_triton("scaled_mm", 2, True)


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
    assert decode_tile(256, 4096, 14336, 132) == (128, 128, 128, 2, 8, 4)
    assert decode_tile(256, 28672, 4096, 132)[3] == 1
    assert decode_tile(256, 6144, 4096, 132)[3] == 1
    assert decode_tile(64, 4096, 4096, 132) == (64, 64, 128, 2, 4, 5)  # 64 tiles, 32 K tiles: 2 splits
    assert decode_tile(16, 64, 1024, 132)[3] == 1  # 8 K tiles: no room to split
    # 16-bit operands: K steps of 64 (128 bytes); Qwen3-0.6B's o_proj at batch 32 (N 1,024, K 2,048): 16 tiles
    # and 32 K steps: split 4 (64 programs of 8 steps; 8 splits would leave 4 steps each)
    assert decode_tile(32, 1024, 2048, 132, 2) == (64, 64, 64, 4, 4, 5)


@needs_triton
@interp
@pytest.mark.parametrize("m, n, k", [(2, 48, 256), (37, 130, 208)])
@pytest.mark.parametrize("split", [1, 3])
def test_16_bit_gemm_equals_reference_interp(m, n, k, split):
    # fp16: the interpreter's bf16 dot reads raw bits (kernels/triton_attention._INTERPRET); the compiled kernel
    # takes bf16 the same way (the sm_90 compile below, the GPU test)
    g = torch.Generator().manual_seed(m + n + k)
    x, w, bias = (torch.randn(m, k, generator=g).half(), torch.randn(n, k, generator=g).half(),
                  torch.randn(n, generator=g).half())
    got = gemm_16bit(x, w, bias, tile=(16, 16, 32, split, 4, 1))
    want = (x.double() @ w.double().t() + bias.double()).half()
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)  # fp16 rounding of the same fp32 sums


@needs_triton
@interp
@pytest.mark.parametrize("with_bias", [False, True])
def test_gated_epilogue_equals_the_unfused_pair_interp(with_bias):
    """act_gated on a [gate | up] weight: silu(gate) * up rounded as F.linear then SiLU-and-mul round (each
    half to 16 bits, SiLU to 16 bits, the product to 16 bits); a split asked for is not taken."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(37, 96, generator=g).half(), torch.randn(2 * 40, 96, generator=g).half()
    bias = torch.randn(2 * 40, generator=g).half() if with_bias else None
    got = gemm_16bit(x, w, bias, tile=(16, 16, 32, 2, 4, 1), act_gated=True)
    gate_up = (x.double() @ w.double().t() + (0 if bias is None else bias.double())).half()
    gate, up = gate_up.float().chunk(2, dim=-1)
    want = (torch.nn.functional.silu(gate).half().float() * up).half()
    assert got.shape == (37, 40)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    assert not ticket_workspace(x.device).any()


@needs_triton
def test_16_bit_gemm_takes_decode_rows_only():
    from meshserve.kernels.fused import decode_gemm_for, linear
    from meshserve.kernels.triton_decode_gemm import MAX_ROWS_16BIT, fits_16bit

    w = torch.zeros(64, 128, dtype=torch.bfloat16)
    rows = lambda n, dtype=torch.bfloat16: torch.zeros(n, 128, dtype=dtype)  # noqa: E731
    assert fits_16bit(rows(2), w) and fits_16bit(rows(MAX_ROWS_16BIT), w)
    assert not fits_16bit(rows(1), w)  # one row: the GEMV's
    assert not fits_16bit(rows(MAX_ROWS_16BIT + 1), w)  # a prefill's GEMM: cuBLAS's
    assert not fits_16bit(rows(4, torch.float32), w.float())  # fp32 reference runs keep cuBLAS
    assert decode_gemm_for(rows(4), w, True) is None  # off the GPU
    torch.testing.assert_close(linear(rows(4), w, decode_gemm=True), rows(4) @ w.t())


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_decode_gemm import _decode_gemm_kernel

names = list(_decode_gemm_kernel.arg_names)
for fp8, gdc, gated in ((True, 0, False), (False, 0, False), (False, 1, False), (False, 1, True)):
    # USE_GDC 1: PDL's wait and early trigger; gated: SiLU-and-mul in the epilogue (split 1 only)
    op = "*fp8e4nv" if fp8 else "*bf16"
    ptrs = dict(a_ptr=op, as_ptr="*fp32", b_ptr=op, bs_ptr="*fp32", bias_ptr="*bf16", c_ptr="*bf16", ws_ptr="*fp32",
                ticket_ptr="*i32")
    bk = 128 if fp8 else 64
    for split, (bm, bn, warps, stages) in ((1, (128, 128, 8, 4)), (2, (128, 128, 8, 4)), (1, (64, 64, 4, 5))):
        if gated and split > 1:
            continue
        const = dict(SCALED=fp8, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GROUP_M=8,
                     EVEN_K=True, ACT_GATED=gated, USE_GDC=gdc)
        sig = {n: "constexpr" if n in const else ptrs.get(n, "i32") for n in names}
        div16 = [n for n in names if n not in const and (n.endswith("_ptr") or n.startswith("stride"))]
        src = ASTSource(_decode_gemm_kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()},
                        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div16})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": warps, "num_stages": stages}).asm["ptx"]
        # the operands straight into Hopper's tensor cores; the split-K ticket only where K is split
        assert "wgmma" in ptx and ("e4m3" in ptx) == fp8 and ("atom" in ptx) == (split > 1), (fp8, split, bm, bn)
        assert ("griddepcontrol.wait" in ptx) == bool(gdc), gdc
print("compiled")
"""


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_decode_gemms_compile_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 16, 64, 256, 512])
@pytest.mark.parametrize("n, k", [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024)])  # Qwen3
def test_16_bit_gemm_equals_f_linear_gpu(m, n, k):
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    got, want = gemm_16bit(x, w), torch.nn.functional.linear(x, w)
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)  # the sum order, one rounding


@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 64, 256, 512])
@pytest.mark.parametrize("inter, hidden", [(3072, 1024), (14336, 4096)])  # Qwen3-0.6B's, Llama-3.1-8B's MLP
def test_gated_epilogue_equals_the_unfused_pair_gpu(m, inter, hidden):
    from meshserve.kernels.triton_ops import silu_and_mul

    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(2 * inter, hidden, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    got = gemm_16bit(x, w, act_gated=True)
    want = silu_and_mul(torch.nn.functional.linear(x, w))
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)  # the sum order, then as one


@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 64, 256, 300])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])  # Llama-3.1-8B
def test_rowwise_gemm_equals_scaled_mm_gpu(m, n, k):
    xq, wq, xs, ws, _ = _operands(m, n, k, seed=m, device="cuda")
    got = fp8_rowwise_gemm(xq, xs, wq, ws, None, torch.bfloat16)
    want = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws[None, :], out_dtype=torch.bfloat16)
    # against the exact sum: one bf16 rounding (half an ulp, 2^-9 of the value) plus the fp32 sums' order, where
    # the outputs near zero are cancellations of terms the size of the largest output (so an absolute part).
    # _scaled_mm (its accumulator promoted every 4 wgmmas) meets the same bound; before the kernel promoted its
    # fp8 accumulator once a K tile, 0.04% of its outputs stood 2-3 bf16 steps from _scaled_mm's
    ref = _reference(xq, wq, xs, ws, None)
    bound = ref.abs() * 2**-8 + ref.abs().max() * 2**-12
    for name, y in (("triton", got), ("_scaled_mm", want)):
        over = ((y.double() - ref).abs() > bound).sum().item()
        assert over == 0, f"{name}: {over} of {y.numel()} outputs past one bf16 rounding of the exact sum"
