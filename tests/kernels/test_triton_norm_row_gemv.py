"""triton_norm_row_gemv.norm_row_gemv (residual add + RMSNorm + the projection in one launch, each program
normalizing the whole row itself) vs rms_norm then the GEMV.

Without CUDA the kernel runs in the Triton CPU interpreter in fp32 and fp16, and compiles to sm_90 code in a
subprocess (Triton's bundled ptxas); the GPU tests take Qwen3-30B-A3B's shapes in bf16, with and without PDL.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.kernels.sm90 import COMPILE_SM90_PRELUDE, assert_compiles_for_sm90
from tests.kernels.test_triton_gemv import _inputs  # the same rows, norm weights and projections

_HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")
gpu = pytest.mark.gpu


def _check(device, dtype, n, k, with_residual, with_bias, normed_out=True, block_n=4, pdl=None):
    """The one launch against rms_norm + the plain projection: the new residual bit for bit, the normed row
    within an ulp on a few elements at most (the statistics' fp32 order), the projection within the GEMV's
    tolerance. Returns the number of normed elements that differ from rms_norm's."""
    from meshserve.kernels.triton_norm_row_gemv import norm_row_gemv, norm_row_gemv_ref
    from meshserve.kernels.triton_ops import rms_norm

    x, residual, norm_weight, weight, bias = _inputs(device, dtype, n, k, with_residual, with_bias)
    eps = 1e-5
    y, h, normed = norm_row_gemv(x, residual, norm_weight, eps, weight, bias, normed_out=normed_out,
                                 block_n=block_n, pdl=pdl)
    if residual is None:
        expected_normed, expected_h = rms_norm(x, norm_weight, eps), x
    else:
        expected_normed, expected_h = rms_norm(x, norm_weight, eps, residual)
    ref, ref_h, ref_normed = norm_row_gemv_ref(x, residual, norm_weight, eps, weight, bias)
    assert y.shape == ref.shape == (1, n) and y.dtype == dtype
    assert torch.equal(h, expected_h) and torch.equal(h, ref_h)
    if residual is not None:  # a fresh tensor, and the inputs are left alone
        assert h.data_ptr() not in (x.data_ptr(), residual.data_ptr())
    else:
        assert h is x
    differ = 0
    if normed_out:
        assert normed.dtype == dtype and normed.shape == x.shape
        ulp = torch.finfo(dtype).eps * expected_normed.abs().float() * 2
        assert ((normed.float() - expected_normed.float()).abs() <= ulp).all()
        differ = int((normed != expected_normed).sum())
        torch.testing.assert_close(normed.float(), ref_normed.float(), atol=0, rtol=2 * torch.finfo(dtype).eps)
    else:
        assert normed is None
    tol = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), ref.float(), atol=tol * ref.abs().max().item(), rtol=tol)
    return differ


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k", [(37, 300), (8, 1024), (6, 2048)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_norm_row_gemv_interp(dtype, n, k, with_residual):
    _check("cpu", dtype, n, k, with_residual, with_bias=n == 37, normed_out=n != 8)


@interp
def test_row_blocks_cover_every_output():
    # programs of 8 rows over 37 outputs: the last block is partial; every row written, program 0 alone stores
    # the row's h and normed values
    _check("cpu", torch.float32, 37, 300, with_residual=True, with_bias=True, block_n=8)


@interp
def test_rejects_what_it_cannot_serve():
    from meshserve.kernels.triton_norm_row_gemv import MAX_ROW_K, fits, norm_row_gemv

    assert fits(MAX_ROW_K) and not fits(MAX_ROW_K + 1)
    x, residual, norm_weight, weight, _ = _inputs("cpu", torch.float32, 8, 64, True, False)
    with pytest.raises(ValueError, match="one row"):
        norm_row_gemv(x.expand(2, 64), residual, norm_weight, 1e-6, weight)
    with pytest.raises(ValueError, match="one dtype"):
        norm_row_gemv(x, residual, norm_weight.half(), 1e-6, weight)
    long_row = torch.zeros(1, MAX_ROW_K + 1)
    with pytest.raises(ValueError, match="at most 2048"):
        norm_row_gemv(long_row, None, torch.ones(MAX_ROW_K + 1), 1e-6, torch.zeros(4, MAX_ROW_K + 1))


def test_row_tile_from_the_environment(monkeypatch):
    from meshserve.kernels.triton_norm_row_gemv import row_tile

    monkeypatch.delenv("MESHSERVE_NORM_ROW_TILE", raising=False)
    assert row_tile(2048) == (8, 8) and row_tile(1024) == (4, 4)
    monkeypatch.setenv("MESHSERVE_NORM_ROW_TILE", "2,4")
    assert row_tile(2048) == row_tile(1024) == (2, 4)
    for bad in ("2", "2,3", "0,4", "a,b"):
        monkeypatch.setenv("MESHSERVE_NORM_ROW_TILE", bad)
        with pytest.raises(ValueError, match="MESHSERVE_NORM_ROW_TILE"):
            row_tile(2048)


@interp
def test_environment_tile_covers_every_output(monkeypatch):
    monkeypatch.setenv("MESHSERVE_NORM_ROW_TILE", "8,4")
    _check("cpu", torch.float32, 37, 300, with_residual=True, with_bias=True, block_n=None)


_COMPILE_SM90 = COMPILE_SM90_PRELUDE + """
from meshserve.kernels.triton_norm_row_gemv import _norm_row_gemv_kernel

p = "*bf16"
sig = {n: p for n in ("x_ptr", "res_ptr", "nw_ptr", "w_ptr", "b_ptr", "y_ptr", "h_out_ptr", "xn_out_ptr")}
sig["eps"] = "fp32"
for gdc, residual, normed, warps, block_k in ((False, True, True, 8, 2048), (1, False, False, 4, 1024),
                                               (2, True, False, 8, 2048)):
    compile_sm90(_norm_row_gemv_kernel, sig, dict(HAS_RESIDUAL=residual, HAS_BIAS=False, STORE_NORMED=normed,
                                                  BLOCK_N=4, BLOCK_K=block_k, USE_GDC=gdc), warps, 3)
print("compiled")
"""


@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernel for the real device")
def test_kernel_compiles_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


# ----------------------------------------------------------------------------------------------------------
# GPU tests (-m gpu): Qwen3-30B-A3B's QKV (2,048 -> 5,120) and router (2,048 -> 128), Qwen3-0.6B's QKV
# ----------------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(5120, 2048), (128, 2048), (4096, 1024), (1027, 1500)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("pdl", [False, True])
def test_norm_row_gemv_gpu(dtype, n, k, with_residual, pdl):
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm_90 or newer")
    differ = _check("cuda", dtype, n, k, with_residual, with_bias=n == 1027, pdl=pdl)
    assert differ <= k // 100  # an ulp where the fp32 statistics round differently, rarely
