"""triton_norm_fold.fold_gemv (the producer GEMV adding the residual and an int64 fixed-point sum of squares,
the consumer GEMV norming on load from it) vs the two kernels it replaces and vs norm_fold_ref.

Without CUDA the kernel runs in the Triton interpreter in fp32 and fp16 (bf16 is GPU-only: the interpreter
rounds fp32 -> bf16 unlike torch) and a subprocess compiles it for sm_90 (tests/kernels/sm90.py). With
`-m gpu`: Llama-3.1-8B's shapes in bf16 against the reference, and the same bits run to run and under CUDA
graph replay (the point of the fixed-point sum).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.norm_fold_ref import (
    SUM_SCALE,
    fixed_point_sum_of_squares,
    fold_gemv_ref,
    inv_rms_from_sum,
    part_limit,
    sum_of_squares,
)
from tests.kernels.sm90 import assert_compiles_for_sm90

_HAS_CUDA = torch.cuda.is_available()
_HAS_TRITON = importlib.util.find_spec("triton") is not None

interp = pytest.mark.skipif(_HAS_CUDA or not _HAS_TRITON, reason="interpreter tests run only without CUDA")
gpu = pytest.mark.gpu


def _rows(device, dtype, n, k, seed=0, exact=False):
    """x [1, K], residual [1, N], norm weight [K], weight [N, K], bias [N]. exact: values of a few bits
    (multiples of 1/8 within +-8) whose squares and their sums fp32 holds exactly in any order."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = scale * torch.randn(*shape, generator=g, device=device)
        return (torch.round(t * 8).clamp(-64, 64) / 8 if exact else t).to(dtype)

    return (
        rnd(1, k, scale=3),
        rnd(1, n),
        (1 + 0.2 * torch.randn(k, generator=g, device=device)).to(dtype),
        rnd(n, k, scale=0.05),
        rnd(n),
    )


def _zero(device):
    """Two norm sites' pairs (whole, fraction), as layers/norm_fold.py holds them."""
    return torch.zeros(2, 2, dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------------- reference
def test_fixed_point_sum_is_exact_order_free_and_saturates():
    h = torch.tensor([[0.5, -1.5, 2.0, 0.25, 3.0]])
    # exact squares: 0.25 + 2.25 + 4 + 0.0625 (one program of 4 rows) + 9 (the last, partial one)
    assert fixed_point_sum_of_squares(h).tolist() == [int(15.5625 * SUM_SCALE), 0]
    assert fixed_point_sum_of_squares(h.flip(-1), block_n=1).tolist() == [int(15.5625 * SUM_SCALE), 0]
    assert inv_rms_from_sum(fixed_point_sum_of_squares(h), 5, 0.0).item() == pytest.approx(
        (15.5625 / 5) ** -0.5
    )
    # small values keep their precision: the pair is the exact sum of the fp32 parts, whatever their order
    for value in (1e-3, 1e-5, 0.1, 7.0):
        row = value * (1 + torch.rand(1, 4096, generator=torch.Generator().manual_seed(0)))
        pair = fixed_point_sum_of_squares(row)
        parts = (row.float() ** 2).view(-1, 4).sum(1).double()
        assert sum_of_squares(pair).item() == pytest.approx(parts.sum().item(), rel=1e-7)
        programs_reversed = row[:, torch.arange(4096).view(-1, 4).flip(0).reshape(-1)]
        assert torch.equal(
            fixed_point_sum_of_squares(programs_reversed), pair
        )  # the same parts: the same bits
    # past the range: every part is capped so the int64 total cannot wrap (too large a norm, never garbage)
    huge = torch.full((1, 4096), 3e4)
    total = fixed_point_sum_of_squares(huge)
    assert total.tolist() == [1024 * int(part_limit(4096, 4)), 0] and 0 < total[0] <= 2**62
    assert fixed_point_sum_of_squares(torch.full((1, 8), float("inf")))[0].item() == 2 * int(part_limit(8, 4))


def test_reference_matches_rms_norm_then_linear():
    from meshserve.kernels.triton_ops import rms_norm_ref

    x, residual, nw, w, b = _rows("cpu", torch.float32, 24, 24, exact=True)
    sums = _zero("cpu")
    h = fold_gemv_ref(x, w, b, residual=residual, sum_out=sums[0])
    assert torch.equal(h, torch.nn.functional.linear(x, w, b) + residual)
    assert (
        torch.equal(sums[0], fixed_point_sum_of_squares(h)) and sums[0, 0] > 0 and sums[1].tolist() == [0, 0]
    )
    w2 = 0.1 * torch.randn(40, 24)
    y = fold_gemv_ref(h, w2, norm_weight=nw, eps=1e-5, sum_in=sums[0])
    torch.testing.assert_close(
        y, torch.nn.functional.linear(rms_norm_ref(h, nw, 1e-5), w2), rtol=1e-6, atol=1e-6
    )


# -------------------------------------------------------------------------------------------- interpreter
@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,exact", [(102, False), (38, True)])  # a partial last block of rows
def test_producer_equals_gemv_then_rms_norm_add(dtype, n, exact):
    from meshserve.kernels.triton_gemv import gemv
    from meshserve.kernels.triton_norm_fold import fold_gemv
    from meshserve.kernels.triton_ops import rms_norm

    x, residual, nw, w, b = _rows("cpu", dtype, n, 260, exact=exact)
    sums = _zero("cpu")
    h = fold_gemv(x, w, b, residual=residual, sum_out=sums[1])
    # the same GEMV loop as gemv, then rms_norm's add: the new residual bit for bit
    _, want = rms_norm(gemv(x, w, b), nw, 1e-5, residual)
    assert torch.equal(h, want)
    assert sums[0].tolist() == [0, 0]
    got, ref = sums[1], fixed_point_sum_of_squares(h)
    # each program's 4 squares may be summed in another order: an ulp of a part at most
    if exact:
        assert torch.equal(got, ref) and got[1] == 0
    else:
        assert sum_of_squares(got).item() == pytest.approx(sum_of_squares(ref).item(), rel=1e-6)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_consumer_equals_rms_norm_then_gemv_exactly(dtype):
    # squares fp32 sums exactly: the fixed-point statistics are rms_norm's bit for bit, so is the projection
    from meshserve.kernels.triton_gemv import gemv
    from meshserve.kernels.triton_norm_fold import fold_gemv
    from meshserve.kernels.triton_ops import rms_norm

    h, _, nw, w, b = _rows("cpu", dtype, 37, 300, exact=True)
    sums = _zero("cpu")
    sums[0] = fixed_point_sum_of_squares(h)
    assert sums[0, 1] == 0  # exact squares: no fraction
    y = fold_gemv(h, w, b, norm_weight=nw, eps=1e-5, sum_in=sums[0])
    assert torch.equal(y, gemv(rms_norm(h, nw, 1e-5), w, b))


@interp
def test_prefetched_loop_keeps_the_fold_chain_bits(monkeypatch):
    """MESHSERVE_GEMV_PREFETCH=dense moves the weight loads a trip earlier in the fold's GEMVs too (the shared
    loop, triton_gemv._stream_rows): producer and consumer give the same bits and sums."""
    from meshserve.kernels.triton_norm_fold import fold_gemv

    x, residual, nw, w, b = _rows("cpu", torch.float32, 38, 600)
    runs = {}
    for value in ("0", "dense"):
        monkeypatch.setenv("MESHSERVE_GEMV_PREFETCH", value)
        sums = _zero("cpu")
        h = fold_gemv(x, w, b, residual=residual, sum_out=sums[0])
        runs[value] = (h, sums[0].clone(), fold_gemv(h, w.t()[:38].contiguous(), norm_weight=nw[:38], eps=1e-5,
                                                      sum_in=sums[0]))
    for plain, prefetched in zip(runs["0"], runs["dense"]):
        assert torch.equal(plain, prefetched)


@interp
def test_chain_matches_reference_with_a_gated_producer():
    from meshserve.kernels.triton_norm_fold import fold_gemv

    gate_up, residual, _, w, b = _rows("cpu", torch.float32, 64, 2 * 96)
    w = w[:, :96].contiguous()
    nw, w2 = 1 + 0.2 * torch.randn(64), 0.1 * torch.randn(50, 64)
    outs = []
    for fn in (fold_gemv, fold_gemv_ref):
        sums = _zero("cpu")
        h = fn(gate_up, w, b, gated=True, residual=residual, sum_out=sums[0])
        outs.append((h, sum_of_squares(sums[0]).item(), fn(h, w2, norm_weight=nw, eps=1e-6, sum_in=sums[0])))
    (h, s, y), (h_ref, s_ref, y_ref) = outs
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    assert abs(s - s_ref) <= 1e-5 * s_ref
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


@interp
def test_fold_gemv_rejects_what_it_cannot_serve():
    from meshserve.kernels.triton_norm_fold import fold_gemv

    x, residual, nw, w, _ = _rows("cpu", torch.float32, 8, 8)
    sums = _zero("cpu")
    with pytest.raises(ValueError, match="one row"):
        fold_gemv(x.expand(2, 8), w)
    with pytest.raises(ValueError, match="sum_out"):
        fold_gemv(x, w, residual=residual, sum_out=sums.int()[0])
    with pytest.raises(ValueError, match="sum_out"):
        fold_gemv(x, w, residual=residual, sum_out=sums[0, 0])
    with pytest.raises(ValueError, match="sum_in"):
        fold_gemv(x, w, norm_weight=nw, sum_in=None)
    with pytest.raises(ValueError, match="one dtype"):
        fold_gemv(x, w, residual=residual.half(), sum_out=sums[0])
    with pytest.raises(ValueError, match="gated"):
        fold_gemv(torch.randn(1, 16), w, gated=True, norm_weight=nw, sum_in=sums[0])


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_norm_fold import _fold_gemv_kernel

B = "*bf16"
names = list(_fold_gemv_kernel.arg_names)
# the producer (gated: down_proj of a small MLP, and plain) and the consumer; PDL off (plain layout) and on
for const, use_gdc, pre_k in [
    (dict(HAS_BIAS=False, GATED=True, NORMED=False, RESIDUAL_OUT=True), 0, 0),
    (dict(HAS_BIAS=True, GATED=False, NORMED=False, RESIDUAL_OUT=True), 2, 2048),
    (dict(HAS_BIAS=False, GATED=False, NORMED=True, RESIDUAL_OUT=False), 0, 0),
    (dict(HAS_BIAS=False, GATED=False, NORMED=True, RESIDUAL_OUT=False), 1, 2048),
]:
    sig = {n: "i32" for n in names}
    sig.update(x_ptr=B, nw_ptr=B, sum_in_ptr="*i64", w_ptr=B, b_ptr=B, res_ptr=B, y_ptr=B, sum_out_ptr="*i64",
               eps="fp32", part_cap="fp32")
    c = dict(const, SUM_SCALE=16777216.0, BLOCK_N=4, BLOCK_K=512, PRE_K=pre_k, USE_GDC=use_gdc)
    sig.update({n: "constexpr" for n in c})
    src = ASTSource(_fold_gemv_kernel, sig, constexprs={(names.index(n),): v for n, v in c.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 8, "num_stages": 3, "launch_pdl": bool(use_gdc)})
    ptx = compiled.asm["ptx"]
    assert ("atom.global" in ptx or "red.global" in ptx) == const["RESIDUAL_OUT"], const
    assert ("griddepcontrol.wait" in ptx) == bool(use_gdc), const
print("compiled")
"""


@pytest.mark.skipif(
    _HAS_CUDA or not _HAS_TRITON, reason="the GPU tests compile the kernel for the real device"
)
def test_kernel_compiles_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


# ----------------------------------------------------------------------------------------------------- GPU
# Llama-3.1-8B: o_proj 4096 -> 4096 and down_proj 14336 -> 4096 produce, QKV (6144) and gate_up (28672)
# consume; Qwen3-0.6B: 1024 wide
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k_in,n_out", [(4096, 6144), (14336, 28672), (1024, 3072)])
def test_fold_chain_gpu_matches_reference(dtype, k_in, n_out):
    from meshserve.kernels.triton_norm_fold import fold_gemv

    hidden = 4096 if k_in != 1024 else 1024
    x, residual, nw, w, _ = _rows("cuda", dtype, hidden, k_in)
    nw = nw[:hidden]  # the second GEMV's norm is over h's features (the first one's input has k_in)
    w2 = (0.02 * torch.randn(n_out, hidden, device="cuda")).to(dtype)
    outs = []
    for fn in (fold_gemv, fold_gemv_ref):
        sums = _zero("cuda")
        h = fn(x, w, residual=residual, sum_out=sums[0])
        outs.append((h, sum_of_squares(sums[0]).item(), fn(h, w2, norm_weight=nw, eps=1e-5, sum_in=sums[0])))
    (h, s, y), (h_ref, s_ref, y_ref) = outs
    tol = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(h.float(), h_ref.float(), rtol=tol, atol=tol * h_ref.abs().max().item())
    assert abs(s - s_ref) <= 4 * tol * s_ref
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol * y_ref.abs().max().item())


@gpu
def test_fold_chain_gpu_bits_repeat_and_survive_graph_replay():
    """The int64 sum does not depend on which program's atomic lands first: the same bits every run, eager
    and replayed (fp32 atomics would not give that)."""
    from meshserve.kernels.triton_norm_fold import fold_gemv

    x, residual, nw, w, _ = _rows("cuda", torch.bfloat16, 4096, 14336)
    w2 = (0.02 * torch.randn(28672, 4096, device="cuda")).to(torch.bfloat16)

    def step():
        sums = torch.zeros(2, 2, dtype=torch.int64, device="cuda")  # captured as a memset, as in the model
        h = fold_gemv(x, w, residual=residual, sum_out=sums[0])
        return h, sums, fold_gemv(h, w2, norm_weight=nw, eps=1e-5, sum_in=sums[0])

    first = step()
    for _ in range(5):
        again = step()
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(first, captured))
