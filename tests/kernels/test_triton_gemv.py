"""triton_gemv.rms_norm_gemv (residual add + RMSNorm folded into the GEMV: a one-program kernel for the row's
h and 1 / rms, the GEMV scaling on load) vs rms_norm then the projection.

Without CUDA the kernel runs in the Triton CPU interpreter in fp32 and fp16 (the interpreter rounds fp32 ->
bf16 unlike torch, so bf16 is GPU-only); a subprocess also compiles it to sm_90 code with Triton's bundled
ptxas, which catches codegen errors the interpreter lets through. The plain GEMV's tests live in
test_triton_ops.py.
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


def _inputs(device, dtype, n, k, with_residual, with_bias, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = (3 * torch.randn(1, k, generator=g, device=device)).to(dtype)
    residual = torch.randn(1, k, generator=g, device=device).to(dtype) if with_residual else None
    norm_weight = (1 + 0.2 * torch.randn(k, generator=g, device=device)).to(dtype)
    weight = (0.05 * torch.randn(n, k, generator=g, device=device)).to(dtype)
    bias = torch.randn(n, generator=g, device=device).to(dtype) if with_bias else None
    return x, residual, norm_weight, weight, bias


def _check(device, dtype, n, k, with_residual, with_bias, block_n=4):
    """The fused kernel against the two kernels it replaces (rms_norm + gemv where they run, else the refs):
    the new residual bit for bit, the projection within the GEMV's own tolerance."""
    from meshserve.kernels.triton_gemv import gemv, rms_norm_gemv, rms_norm_gemv_ref
    from meshserve.kernels.triton_ops import rms_norm

    x, residual, norm_weight, weight, bias = _inputs(device, dtype, n, k, with_residual, with_bias)
    eps = 1e-5
    y, new_residual = rms_norm_gemv(x, residual, norm_weight, eps, weight, bias, block_n=block_n)
    if residual is None:
        normed, expected_residual = rms_norm(x, norm_weight, eps), x
    else:
        normed, expected_residual = rms_norm(x, norm_weight, eps, residual)
    two_kernels = gemv(normed, weight, bias)
    ref, ref_residual = rms_norm_gemv_ref(x, residual, norm_weight, eps, weight, bias)
    assert y.shape == ref.shape == (1, n) and y.dtype == dtype
    assert new_residual.dtype == dtype and torch.equal(new_residual, expected_residual)
    assert torch.equal(new_residual, ref_residual)
    if residual is not None:  # a fresh tensor, and the inputs are left alone
        assert new_residual.data_ptr() not in (x.data_ptr(), residual.data_ptr())
    # the fp32 sums differ in order only (the sum of squares too): a couple of output ulps
    tol = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    for other in (two_kernels, ref):
        torch.testing.assert_close(y.float(), other.float(), atol=tol * other.abs().max().item(), rtol=tol)
    return y, two_kernels


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k", [(37, 300), (8, 1024), (5, 513)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_gemv_interp(dtype, n, k, with_residual):
    _check("cpu", dtype, n, k, with_residual, with_bias=n == 37)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_gemv_equals_two_kernels_exactly(dtype):
    # the one-program statistics are rms_norm's, so the GEMV sees rms_norm's normed row bit for bit and sums
    # the same products in the same order (the per-program reduction of the first version did not, in fp32)
    y, two_kernels = _check("cpu", dtype, 64, 512, with_residual=True, with_bias=False)
    assert torch.equal(y, two_kernels)


def _check_act_out(device, dtype, n, k, with_residual, with_bias):
    """rms_norm_gemv with SiLU-and-mul in the GEMV's epilogue: the residual and the bits of rms_norm_gemv then the
    SiLU kernel, the reference within the GEMV's tolerance."""
    from meshserve.kernels.triton_gemv import rms_norm_gemv, rms_norm_gemv_ref
    from meshserve.kernels.triton_ops import silu_and_mul

    x, residual, norm_weight, weight, bias = _inputs(device, dtype, n, k, with_residual, with_bias, seed=2)
    y, new_residual = rms_norm_gemv(x, residual, norm_weight, 1e-5, weight, bias, act_out=True)
    gate_up, plain_residual = rms_norm_gemv(x, residual, norm_weight, 1e-5, weight, bias)
    assert y.shape == (1, n // 2) and torch.equal(new_residual, plain_residual)
    assert torch.equal(y, silu_and_mul(gate_up))
    ref, _ = rms_norm_gemv_ref(x, residual, norm_weight, 1e-5, weight, bias, act_out=True)
    tol = 1e-4 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), ref.float(), atol=tol * ref.abs().max().item(), rtol=tol)


@interp
@pytest.mark.parametrize("n,k,with_residual", [(38, 300, True), (64, 512, False)])
def test_rms_norm_gemv_act_out_interp(n, k, with_residual):
    _check_act_out("cpu", torch.float32, n, k, with_residual, with_bias=n == 38)


@gpu
@pytest.mark.parametrize("n,k", [(28672, 4096), (2054, 4000)])
def test_rms_norm_gemv_act_out_gpu(n, k):
    _check_act_out("cuda", torch.bfloat16, n, k, with_residual=True, with_bias=n == 2054)


@interp
def test_rms_norm_gemv_row_blocks_cover_every_output():
    # programs of 8 rows over 37 outputs: the last block is partial; every row is written (empty rows would
    # keep torch.empty garbage and fail the comparison)
    _check("cpu", torch.float32, 37, 300, with_residual=True, with_bias=True, block_n=8)


@interp
def test_rms_norm_gemv_rejects_what_it_cannot_serve():
    from meshserve.kernels.triton_gemv import rms_norm_gemv

    x, residual, norm_weight, weight, _ = _inputs("cpu", torch.float32, 8, 64, True, False)
    with pytest.raises(ValueError, match="one row"):
        rms_norm_gemv(x.expand(2, 64), residual, norm_weight, 1e-6, weight)
    with pytest.raises(ValueError, match="one dtype"):
        rms_norm_gemv(x, residual, norm_weight.half(), 1e-6, weight)


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_gemv import _gemv_kernel, _residual_rms_kernel

def compile(kernel, pointers, const, warps, floats=()):
    names = list(kernel.arg_names)
    sig = {n: "i32" for n in names}
    sig.update(pointers)
    sig.update({f: "fp32" for f in floats})
    sig.update({n: "constexpr" for n in const})
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3})

# the plain layout (PRE_K 0, no PDL) in fp16 without a residual; tests/kernels/test_pdl.py compiles the rest
p = "*fp16"
compile(_residual_rms_kernel, dict(x_ptr=p, res_ptr=p, res_out_ptr=p, inv_ptr="*fp32"),
        dict(HAS_RESIDUAL=False, BLOCK=1024, USE_GDC=False), 4, floats=("eps",))
compile(_gemv_kernel, dict(x_ptr=p, inv_ptr="*fp32", nw_ptr=p, w_ptr=p, b_ptr=p, y_ptr=p),
        dict(HAS_BIAS=False, GATED=False, NORMED=True, BLOCK_N=4, BLOCK_K=256, PRE_K=0, USE_GDC=False), 4)
# the prefetched loop (MESHSERVE_GEMV_PREFETCH), plain and gated, on the wide tile's 8 and 4 warps
for gated in (False, True):
    for warps in (8, 4):
        compile(_gemv_kernel, dict(x_ptr=p, inv_ptr="*fp32", nw_ptr=p, w_ptr=p, b_ptr=p, y_ptr=p),
                dict(HAS_BIAS=False, GATED=gated, NORMED=False, BLOCK_N=4, BLOCK_K=512, PRE_K=0, PREFETCH=True,
                     USE_GDC=False), warps)
# the gate/up GEMV with SiLU-and-mul in its epilogue (ACT_OUT), the 8B's wide tile, plain and normed
for normed in (False, True):
    compile(_gemv_kernel, dict(x_ptr=p, inv_ptr="*fp32", nw_ptr=p, w_ptr=p, b_ptr=p, y_ptr=p),
            dict(HAS_BIAS=True, GATED=False, NORMED=normed, BLOCK_N=4, BLOCK_K=512, PRE_K=0, PREFETCH=True,
                 USE_GDC=False, ACT_OUT=True), 4)
print("compiled")
"""


@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernel for the real device")
def test_kernel_compiles_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


# ----------------------------------------------------------------------------------------------------------
# GPU tests (-m gpu): Llama-3.1-8B's shapes in bf16 (QKV 4096 -> 6144, gate_up 4096 -> 28672), Qwen3-0.6B's
# ----------------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (28672, 4096), (4096, 1024), (6144, 1024), (1027, 4000)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_gemv_gpu(dtype, n, k, with_residual):
    _check("cuda", dtype, n, k, with_residual, with_bias=n == 1027)


def test_wide_tile_from_the_environment(monkeypatch):
    from meshserve.kernels.triton_gemv import wide_tile

    assert wide_tile() == wide_tile(4096) == wide_tile(14336) == (512, 4, 4)  # Llama-3.1-8B's rows
    assert wide_tile(2048) == wide_tile(3072) == (512, 8, 4)  # Qwen3-30B-A3B's, Qwen3-0.6B's down_proj
    monkeypatch.setenv("MESHSERVE_GEMV_WIDE_TILE", "256,4")
    assert wide_tile() == (256, 4, 4)
    monkeypatch.setenv("MESHSERVE_GEMV_WIDE_TILE", "512,8,2")
    assert wide_tile() == wide_tile(2048) == (512, 8, 2)
    monkeypatch.setenv("MESHSERVE_GEMV_WIDE_TILE", "256")
    with pytest.raises(ValueError, match=r"block_k,num_warps\[,block_n\]"):
        wide_tile()


@interp
@pytest.mark.parametrize("block_n", [1, 2])
def test_gemv_of_a_wide_row_with_fewer_rows_a_program(monkeypatch, block_n):
    """MESHSERVE_GEMV_WIDE_TILE's block_n (an A/B knob): every output row still computed, as gemv_ref does."""
    from meshserve.kernels.triton_gemv import gemv, gemv_ref

    monkeypatch.setenv("MESHSERVE_GEMV_WIDE_TILE", f"512,4,{block_n}")
    x, _, _, weight, bias = _inputs("cpu", torch.float32, 7, 2048, False, True)
    torch.testing.assert_close(gemv(x, weight, bias), gemv_ref(x, weight, bias), atol=1e-4, rtol=1e-4)


def test_prefetch_switch_from_the_environment(monkeypatch):
    from meshserve.kernels.triton_gemv import gemv_prefetch

    def kinds():
        return tuple(gemv_prefetch(kind) for kind in ("dense", "moe"))

    monkeypatch.delenv("MESHSERVE_GEMV_PREFETCH", raising=False)
    assert kinds() == (True, False)  # the dense GEMV's, measured faster on the H200
    for value, expected in (("dense", (True, False)), ("moe", (False, True)), (" MOE , dense", (True, True)),
                            ("all", (True, True)), ("1", (True, True)), ("0", (False, False)),
                            ("none", (False, False)), ("", (True, False))):
        monkeypatch.setenv("MESHSERVE_GEMV_PREFETCH", value)
        assert kinds() == expected, value
    for bad in ("yes", "dense,fp8"):
        monkeypatch.setenv("MESHSERVE_GEMV_PREFETCH", bad)
        with pytest.raises(ValueError, match="MESHSERVE_GEMV_PREFETCH"):
            gemv_prefetch("dense")


@interp
@pytest.mark.parametrize("n,k,gated", [(7, 300, False), (5, 2048 + 100, False), (6, 600, True)])
def test_prefetched_loop_gives_the_same_bits(monkeypatch, n, k, gated):
    """MESHSERVE_GEMV_PREFETCH only moves the weight loads a trip earlier: the same sums in the same order, so the
    plain, gated and normed GEMVs' outputs are bit for bit the loop's without it (several K tiles, a masked tail,
    the wide tile past 2,048)."""
    from meshserve.kernels.triton_gemv import gemv, rms_norm_gemv

    x, residual, norm_weight, weight, bias = _inputs("cpu", torch.float32, n, k, True, True)
    row = torch.cat([x, residual], dim=-1) if gated else x
    runs = {}
    for value in ("0", "dense"):
        monkeypatch.setenv("MESHSERVE_GEMV_PREFETCH", value)
        runs[value] = (gemv(row, weight, bias, gated=gated),
                       rms_norm_gemv(x, residual, norm_weight, 1e-5, weight, bias)[0])
    for plain, prefetched in zip(runs["0"], runs["dense"]):
        assert torch.equal(plain, prefetched)


@gpu
@pytest.mark.parametrize("n,k,gated", [(6144, 4096, False), (4096, 14336, True), (5120, 2048, False)])
def test_prefetched_loop_gives_the_same_bits_gpu(monkeypatch, n, k, gated):
    """Llama-3.1-8B's QKV and down (gated) and Qwen3-30B-A3B's QKV shapes in bf16, with and without PDL."""
    from meshserve.kernels import pdl
    from meshserve.kernels.triton_gemv import gemv

    x, residual, _, weight, _ = _inputs("cuda", torch.bfloat16, n, k, True, False)
    row = torch.cat([x, residual], dim=-1) if gated else x
    for on in (False, True):
        with pdl.enabled(on):
            runs = []
            for value in ("0", "dense"):
                monkeypatch.setenv("MESHSERVE_GEMV_PREFETCH", value)
                runs.append(gemv(row, weight, gated=gated))
            assert torch.equal(*runs), on
