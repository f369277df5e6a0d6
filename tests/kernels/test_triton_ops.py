"""Triton rms_norm / silu_and_mul / rotary vs their torch references (and the layer modules).

Without CUDA the kernels run in the Triton CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) in
fp32/fp16 (the interpreter rounds fp32 -> bf16 differently from torch, so bf16 is GPU-only).
Tolerances: fp32 1e-5; fp16/bf16: one unit in the last place of the output dtype (atol/rtol = eps).
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

if importlib.util.find_spec("triton") is not None:
    from meshserve.kernels.triton_ops import (
        apply_rotary,
        apply_rotary_ref,
        qkv_rope_cache,
        qkv_rope_cache_ref,
        rms_norm,
        rms_norm_ref,
        silu_and_mul,
        silu_and_mul_ref,
    )

interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")
gpu = pytest.mark.gpu


def close(a, b, dtype):
    """Within 2 units in the last place: the kernel's fp32 reduction order differs from torch's, which can
    flip one rounding of a 16-bit output (seen: 1 element in 1M off by one fp16 ulp on the H100)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def _rms_case(device, dtype, shape, w_dtype):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device).to(dtype)
    r = torch.randn(shape, generator=g, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g, device=device)).to(w_dtype)
    return x, r, w


def _check_rms(device, dtype, shape, w_dtype):
    from meshserve.layers.norm import RMSNorm

    x, r, w = _rms_case(device, dtype, shape, w_dtype)
    out = rms_norm(x, w, 1e-6)
    close(out, rms_norm_ref(x, w, 1e-6), dtype)  # the normalised x is rounded to x's dtype
    out, res = rms_norm(x, w, 1e-6, r)
    ref_out, ref_res = rms_norm_ref(x, w, 1e-6, r)
    close(out, ref_out, dtype)  # the normalised x is rounded to x's dtype
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
    layer = RMSNorm(shape[-1], eps=1e-6).to(device=device, dtype=w_dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        close(rms_norm(x, w, 1e-6), layer(x), dtype)  # the normalised x is rounded to x's dtype
        close(rms_norm(x, w, 1e-6, r)[0], layer(x, r)[0], dtype)  # the normalised x is rounded to x's dtype


def _check_silu(device, dtype, shape):
    from meshserve.layers.activation import SiluAndMul

    x = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(1), device=device).to(dtype)
    out = silu_and_mul(x)
    close(out, silu_and_mul_ref(x), dtype)
    close(out, SiluAndMul()(x), dtype)


def _check_rotary(device, dtype, t, h, hkv, d, max_pos=64):
    from meshserve.layers.rotary import RotaryEmbedding

    cfg = SimpleNamespace(rope_theta=10000.0, rope_scaling=None)
    rope = RotaryEmbedding(cfg, d, max_pos).to(device)
    g = torch.Generator(device=device).manual_seed(2)
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g, device=device).to(dtype)
    q = qkv[:, : h * d].view(t, h, d)  # strided views, as split from the fused projection
    k = qkv[:, h * d : (h + hkv) * d].view(t, hkv, d)
    pos = torch.randint(0, max_pos, (t,), generator=g, device=device)
    qo, ko = apply_rotary(pos, q, k, rope.cos_cache, rope.sin_cache)
    qr, kr = apply_rotary_ref(pos, q, k, rope.cos_cache, rope.sin_cache)
    ql, kl = rope(pos, q, k)
    for a, b in ((qo, qr), (ko, kr), (qo, ql), (ko, kl)):
        close(a, b, dtype)


def _check_qkv_rope_cache(device, dtype, t, h, hkv, d, with_norm, block_size=4, max_pos=64, kv_scales=None):
    """The fused prologue equals the reference composition: same q, same cache contents (untouched slots
    included), padding rows (slot -1) write nothing. kv_scales (k_scale, v_scale): an fp8 cache, K / k_scale
    and V / v_scale saturated (_assert_fp8_close)."""
    from meshserve.layers.rotary import RotaryEmbedding

    cfg = SimpleNamespace(rope_theta=10000.0, rope_scaling=None)
    rope = RotaryEmbedding(cfg, d, max_pos).to(device)
    g = torch.Generator(device=device).manual_seed(3)
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g, device=device).to(dtype)
    pos = torch.randint(0, max_pos, (t,), generator=g, device=device)
    num_blocks = -(-t // block_size) + 2
    slots = torch.randperm(num_blocks * block_size, generator=g, device=device)[:t]
    slots[t // 2] = -1  # a CUDA-graph padding row
    qw = kw = None
    if with_norm:
        qw = (1 + 0.1 * torch.randn(d, generator=g, device=device)).to(dtype)
        kw = (1 + 0.1 * torch.randn(d, generator=g, device=device)).to(dtype)
    cache_dtype = dtype if kv_scales is None else torch.float8_e4m3fn
    caches = [torch.full((2, num_blocks, block_size, hkv, d), 7.0, device=device).to(cache_dtype) for _ in range(2)]
    scales = kv_scales or (1.0, 1.0)
    q = qkv_rope_cache(qkv, pos, rope.cos_cache, rope.sin_cache, qw, kw, 1e-6, caches[0], slots, h, hkv, *scales)
    q_ref = qkv_rope_cache_ref(qkv, pos, rope.cos_cache, rope.sin_cache, qw, kw, 1e-6, caches[1], slots, h, hkv,
                               *scales)
    close(q, q_ref, dtype)
    if kv_scales is None:
        close(caches[0], caches[1], dtype)
    else:
        ulps = 2 * torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
        _assert_fp8_close(caches[0], caches[1], (ulps / scales[0], ulps / scales[1]))
        assert torch.isfinite(caches[0].float()).all()
        if qkv[:, (h + hkv) * d:].float().abs().max() / scales[1] > 448:  # v / v_scale past e4m3's range
            assert caches[0][1].float().abs().max() == 448  # saturates, never NaN
    # untouched slots keep their 7.0 in both (counting 7.0s would not do: an fp8 cache holds written 7.0s too)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=device)
    untouched[slots[slots >= 0]] = False
    assert untouched.any()
    from meshserve.kernels.kv_layout import v_rows

    for cache in caches:  # K, and V in whichever block layout the process keeps (kernels/kv_layout.py)
        for part in (cache[0], v_rows(cache)):
            assert (part.reshape(num_blocks * block_size, hkv, d)[untouched].float() == 7.0).all()


def _assert_fp8_close(got: torch.Tensor, ref: torch.Tensor, atol: tuple[float, float] = (0.0, 0.0)) -> None:
    """fp8 caches [2 (K, V), ...] equal but for a few values one e4m3 step apart or within atol (K's, V's, in cache
    units): the difference close() allows a 16-bit cache, an absolute 2 ulps of the 16-bit value before the cast,
    as rotation's cancellations leave small k with the error of its larger terms (2 subnormal steps at |k| ~
    0.02 on an H200), and, in the interpreter only, values the reference rounded up to a power of two (the
    interpreter's fp32 -> fp8 cast lands a binade low: tests/quant_fixtures.py)."""
    g, r = got.float(), ref.float()
    differ = got.view(torch.uint8) != ref.view(torch.uint8)
    tol = torch.tensor(atol, device=g.device).view(2, *([1] * (g.dim() - 1)))
    one_step = (g - r).abs() <= torch.maximum(r.abs() / 8, tol)
    binade_low = (torch.log2(r.abs()).frac() == 0) & (g == r / 2) & (not got.is_cuda)
    bad = differ & ~one_step & ~binade_low
    assert differ.float().mean() < 0.02 and not bad.any(), f"got {g[bad][:8].tolist()} ref {r[bad][:8].tolist()}"


# ----------------------------------------------------------------------------------------------------------
# interpreter
# ----------------------------------------------------------------------------------------------------------
@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h,hkv,d", [(4, 2, 24), (4, 4, 16), (8, 1, 32)])
@pytest.mark.parametrize("with_norm", [False, True])
def test_qkv_rope_cache_interp(dtype, h, hkv, d, with_norm):
    _check_qkv_rope_cache("cpu", dtype, 7, h, hkv, d, with_norm)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("v_layout", ["rows", "transposed"])  # MESHSERVE_FP8_V_LAYOUT (kernels/kv_layout.py)
def test_qkv_rope_cache_fp8_interp(dtype, with_norm, v_layout, monkeypatch):
    monkeypatch.setenv("MESHSERVE_FP8_V_LAYOUT", v_layout)
    # v_scale 1/512: V's |v| ~ 1 lands past 448 and saturates
    _check_qkv_rope_cache("cpu", dtype, 7, 4, 2, 24, with_norm, kv_scales=(0.5, 1 / 512))

@interp
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                           (torch.float16, torch.float32)])
@pytest.mark.parametrize("shape", [(5, 96), (2, 3, 40)])
def test_rms_norm_interp(dtype, w_dtype, shape):
    _check_rms("cpu", dtype, shape, w_dtype)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(4, 384), (2, 3, 50)])
def test_silu_and_mul_interp(dtype, shape):
    _check_silu("cpu", dtype, shape)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h,hkv,d", [(4, 2, 24), (3, 1, 64)])
def test_rotary_interp(dtype, h, hkv, d):
    _check_rotary("cpu", dtype, 6, h, hkv, d)


# ----------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                           (torch.bfloat16, torch.float32), (torch.float32, torch.float32)])
@pytest.mark.parametrize("shape", [(1, 4096), (257, 4096), (64, 8192), (33, 896), (7, 5120)])
def test_rms_norm_gpu(dtype, w_dtype, shape):
    _check_rms("cuda", dtype, shape, w_dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 2 * 14336), (300, 2 * 11008), (17, 2 * 4864)])
def test_silu_and_mul_gpu(dtype, shape):
    _check_silu("cuda", dtype, shape)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("h,hkv,d", [(32, 8, 128), (32, 32, 64), (14, 2, 64), (4, 2, 24)])
def test_rotary_gpu(dtype, h, hkv, d):
    _check_rotary("cuda", dtype, 513, h, hkv, d, max_pos=4096)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("h,hkv,d", [(32, 8, 128), (16, 8, 128), (32, 32, 64), (32, 4, 128), (14, 2, 64)])
@pytest.mark.parametrize("with_norm", [False, True])
def test_qkv_rope_cache_gpu(dtype, h, hkv, d, with_norm):
    _check_qkv_rope_cache("cuda", dtype, 513, h, hkv, d, with_norm, block_size=16, max_pos=4096)


@gpu
@pytest.mark.parametrize("h,hkv,with_norm", [(32, 8, False), (16, 8, True)])  # Llama-3.1-8B, Qwen3-0.6B
@pytest.mark.parametrize("kv_scales", [(1.0, 1.0), (0.25, 1 / 512)])  # powers of two: one rounding on any path
def test_qkv_rope_cache_fp8_gpu(h, hkv, with_norm, kv_scales):
    _check_qkv_rope_cache("cuda", torch.bfloat16, 513, h, hkv, 128, with_norm, block_size=16, max_pos=4096,
                          kv_scales=kv_scales)


# ----------------------------------------------------------------------------------------------------------
# batch-1 projection (GEMV)
# ----------------------------------------------------------------------------------------------------------
def _check_gemv(device, dtype, n, k, with_bias, gated=False):
    from meshserve.kernels.triton_gemv import gemv, gemv_ref

    g = torch.Generator(device=device).manual_seed(4)
    w = (0.05 * torch.randn(n, k, generator=g, device=device)).to(dtype)
    x = torch.randn(1, 2 * k if gated else k, generator=g, device=device).to(dtype)
    b = torch.randn(n, generator=g, device=device).to(dtype) if with_bias else None
    y, ref = gemv(x, w, b, gated=gated), gemv_ref(x, w, b, gated=gated)
    assert y.shape == ref.shape == (1, n) and y.dtype == ref.dtype
    # the fp32 sums differ in order only: within a couple of output ulps (fp32: 1e-4 relative)
    tol = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), ref.float(), atol=tol * ref.abs().max().item(), rtol=tol)


@interp
@pytest.mark.parametrize("n,k", [(37, 300), (8, 1024), (5, 513)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_gemv_interp(n, k, with_bias, gated):
    _check_gemv("cpu", torch.float32, n, k, with_bias, gated)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (151936, 1024), (1024, 3072), (1027, 4000)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_gemv_gpu(dtype, n, k, with_bias, gated):
    _check_gemv("cuda", dtype, n, k, with_bias, gated)


def _check_gemv_act_out(device, dtype, n, k, with_bias, pdl=None):
    """The gate/up GEMV with SiLU-and-mul in its epilogue: the bits of the GEMV then the SiLU kernel (the same
    row sums, silu_and_mul's roundings), and the reference within the GEMV's tolerance."""
    from meshserve.kernels.triton_gemv import gemv, gemv_ref
    from meshserve.kernels.triton_ops import silu_and_mul

    g = torch.Generator(device=device).manual_seed(5)
    w = (0.05 * torch.randn(n, k, generator=g, device=device)).to(dtype)
    x = torch.randn(1, k, generator=g, device=device).to(dtype)
    b = torch.randn(n, generator=g, device=device).to(dtype) if with_bias else None
    y = gemv(x, w, b, act_out=True, pdl=pdl)
    two_kernels = silu_and_mul(gemv(x, w, b, pdl=pdl))
    assert y.shape == two_kernels.shape == (1, n // 2) and y.dtype == dtype
    assert torch.equal(y, two_kernels)
    ref = gemv_ref(x, w, b, act_out=True)
    tol = 1e-4 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), ref.float(), atol=tol * ref.abs().max().item(), rtol=tol)


@interp
@pytest.mark.parametrize("n,k", [(38, 300), (8, 1024), (10, 2048 + 100)])  # pairs past the last program, K tails
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_act_out_interp(n, k, with_bias):
    _check_gemv_act_out("cpu", torch.float32, n, k, with_bias)


@interp
def test_gemv_act_out_rejects_what_it_cannot_serve():
    from meshserve.kernels.triton_gemv import gemv

    with pytest.raises(ValueError, match="even number"):
        gemv(torch.randn(1, 16), torch.randn(7, 16), act_out=True)
    with pytest.raises(ValueError, match="no gated input"):
        gemv(torch.randn(1, 32), torch.randn(8, 16), gated=True, act_out=True)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(28672, 4096), (6144, 1024), (2054, 4000)])  # Llama-3.1-8B, Qwen3-0.6B, odd
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("pdl", [False, True])
def test_gemv_act_out_gpu(dtype, n, k, with_bias, pdl):
    _check_gemv_act_out("cuda", dtype, n, k, with_bias, pdl)
