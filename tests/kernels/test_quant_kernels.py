"""Quantization math (kernels/quant_ref.py), the checkpoint packings (layers/quantization/int4_formats.py) and the
Triton kernels (kernels/triton_quant.py, in the interpreter without CUDA; `-m gpu` at real sizes).

The packings are checked against unpackers written here, element by element, from the formats' descriptions:
AWQ packs 8 output features per int32 with feature order [0, 2, 4, 6, 1, 3, 5, 7] over the nibbles; GPTQ packs
8 consecutive input features per int32 of qweight and 8 consecutive output features per int32 of qzeros.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()

from meshserve.kernels.quant_ref import (
    FP8_DTYPE,
    fp8_linear_ref,
    fp8_weight_only_ref,
    int4_dequant_ref,
    int4_linear_ref,
    pack_int4_rows,
    quantize_fp8_per_channel,
    quantize_fp8_per_token,
    quantize_int4_groups,
    unpack_int4_rows,
)
from meshserve.layers.quantization.int4_formats import (
    awq_pack,
    awq_unpack,
    gptq_pack_cols,
    gptq_unpack_cols,
)
from tests.quant_fixtures import assert_fp8_linear_close

_HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not _HAS_TRITON, reason="triton not installed")
interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")


def _nibble(word: int, i: int) -> int:
    return ((word & 0xFFFFFFFF) >> (4 * i)) & 0xF


def independent_awq_unpack(packed: torch.Tensor) -> list[list[int]]:
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = packed.shape
    out = [[0] * (cols * 8) for _ in range(rows)]
    for r in range(rows):
        for c in range(cols):
            word = int(packed[r, c])
            for i in range(8):
                out[r][8 * c + order[i]] = _nibble(word, i)
    return out


def independent_gptq_unpack_rows(packed: torch.Tensor) -> list[list[int]]:
    rows, cols = packed.shape
    out = [[0] * cols for _ in range(rows * 8)]
    for r in range(rows):
        for c in range(cols):
            for i in range(8):
                out[8 * r + i][c] = _nibble(int(packed[r, c]), i)
    return out


def independent_gptq_unpack_cols(packed: torch.Tensor) -> list[list[int]]:
    rows, cols = packed.shape
    return [[_nibble(int(packed[r, c]), i) for c in range(cols) for i in range(8)] for r in range(rows)]


def test_packings_match_the_format_descriptions():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (16, 24), generator=g, dtype=torch.int32)
    assert independent_awq_unpack(awq_pack(q)) == q.tolist()
    assert independent_gptq_unpack_rows(pack_int4_rows(q)) == q.tolist()
    assert independent_gptq_unpack_cols(gptq_pack_cols(q)) == q.tolist()
    assert torch.equal(awq_unpack(awq_pack(q)), q)
    assert torch.equal(unpack_int4_rows(pack_int4_rows(q)), q)
    assert torch.equal(gptq_unpack_cols(gptq_pack_cols(q)), q)
    # one word spelled out: features 0..7 with values 1..8 -> AWQ nibbles hold 1,3,5,7,2,4,6,8
    word = int(awq_pack(torch.arange(1, 9, dtype=torch.int32)[None, :])[0, 0])
    assert [_nibble(word, i) for i in range(8)] == [1, 3, 5, 7, 2, 4, 6, 8]


def test_int4_quantize_dequant_error_is_within_half_a_step():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 64, generator=g)
    q, scales, zeros = quantize_int4_groups(w, 16)
    assert q.min() >= 0 and q.max() <= 15 and q.shape == (64, 40) and scales.shape == (4, 40)
    deq = int4_dequant_ref(pack_int4_rows(q), scales, zeros, 16, dtype=torch.float32)
    step = scales.repeat_interleave(16, dim=0)
    assert ((deq - w.t()).abs() <= step / 2 + 1e-6).all()
    # g_idx equal to k // G gives the same weight
    g_idx = torch.arange(64, dtype=torch.int32) // 16
    assert torch.equal(int4_dequant_ref(pack_int4_rows(q), scales, zeros, 16, g_idx), deq.to(scales.dtype))


def test_fp8_quantization():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 48, generator=g)
    wq, ws = quantize_fp8_per_channel(w)
    assert wq.dtype == FP8_DTYPE and ws.shape == (32,)
    assert torch.allclose(wq.float().abs().amax(1), torch.full((32,), 448.0))
    torch.testing.assert_close(wq.float() * ws[:, None], w, rtol=0.07, atol=1e-3)
    x = torch.randn(5, 48, generator=g)
    xq, xs = quantize_fp8_per_token(x)
    assert xs.shape == (5, 1)
    y = fp8_linear_ref(x, wq, ws)
    exact = x @ w.t()
    assert (y - exact).norm() / exact.norm() < 0.05  # e4m3 keeps 3 mantissa bits: ~2-3% per product
    # the reference is exactly the upcast product of the quantized operands
    torch.testing.assert_close(y, (xq.float() * xs) @ (wq.float() * ws[:, None]).t())
    # a static input scale replaces the per-token one
    y_static = fp8_linear_ref(x, wq, ws, input_scale=torch.tensor(0.02))
    assert (y_static - exact).norm() / exact.norm() < 0.05 and not torch.equal(y_static, y)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
def _int4_case(k, n, group, seed, act_order=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q, scales, zeros = quantize_int4_groups(w, group)
    g_idx = None
    if act_order:  # scatter the groups over the input features
        g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=g)].to(torch.int32).to(device)
    return (pack_int4_rows(q).to(device), scales.half().to(device), zeros.half().to(device), g_idx)


@needs_triton
@interp
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_matmul_interp(m, act_order):
    from meshserve.kernels.triton_quant import int4_matmul

    qweight, scales, zeros, g_idx = _int4_case(96, 40, 32, seed=m, act_order=act_order)
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(9))
    bias = torch.randn(40)
    out = int4_matmul(x, qweight, scales, zeros, 32, g_idx, bias)
    ref = int4_linear_ref(x, qweight, scales, zeros, 32, g_idx, bias)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@needs_triton
@interp
def test_fp8_gemv_interp():
    from meshserve.kernels.triton_fp8_gemv import fp8_gemv

    g = torch.Generator().manual_seed(3)
    wq, ws = quantize_fp8_per_channel(torch.randn(40, 600, generator=g))
    x, bias = torch.randn(1, 600, generator=g), torch.randn(40, generator=g)
    torch.testing.assert_close(
        fp8_gemv(x, wq, ws, bias), fp8_weight_only_ref(x, wq, ws, bias), atol=1e-4, rtol=1e-4
    )


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("kn", [(4096, 6144), (14336, 4096)])
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_matmul_gpu(m, kn, act_order):
    from meshserve.kernels.triton_quant import int4_matmul

    k, n = kn
    qweight, scales, zeros, g_idx = _int4_case(k, n, 128, seed=m, act_order=act_order, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = int4_matmul(x, qweight, scales, zeros, 128, g_idx)
    # the kernel's roundings: weights dequantized in fp32, rounded once to bf16, exact products, fp32 sums
    # (an fp32-weight oracle differs by the weights' bf16 rounding, up to ~1 absolute over K = 14336)
    w = int4_dequant_ref(qweight, scales, zeros, 128, g_idx, dtype=torch.bfloat16).float()
    ref = x.float() @ w
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kn", [(4096, 6144), (14336, 4096), (576, 1536)])
def test_fp8_gemv_and_scaled_mm_gpu(kn):
    from meshserve.kernels.quant_ops import fp8_linear
    from meshserve.kernels.triton_fp8_gemv import fp8_gemv

    k, n = kn
    wq, ws = quantize_fp8_per_channel(torch.randn(n, k, device="cuda") * 0.02)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(
        fp8_gemv(x, wq, ws).float(), fp8_weight_only_ref(x.float(), wq, ws), atol=2e-2, rtol=2e-2
    )
    xb = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
    out = fp8_linear(xb, wq, ws, None, None, gemv=True)  # 64 rows: torch._scaled_mm
    assert_fp8_linear_close(out, xb, wq, ws)
