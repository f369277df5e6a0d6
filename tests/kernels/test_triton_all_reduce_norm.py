"""The fused all-reduce + residual add + RMSNorm kernel (kernels/triton_all_reduce_norm.py): its reference
against the unfused layers, the kernel against the reference in the interpreter (one process playing rank 0
of two, the peer's buffer and signal already in place), the sm_90 compile, and on two GPUs the kernel
against NCCL all-reduce + the Triton add + RMSNorm."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.kernels.sm90 import assert_compiles_for_sm90

_HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")


def _case(rows: int, hidden: int, dtype: torch.dtype, world: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(rows, hidden, generator=g).to(dtype) for _ in range(world)]
    residual = torch.randn(rows, hidden, generator=g).to(dtype)
    weight = (1 + 0.2 * torch.randn(hidden, generator=g)).to(dtype)
    return parts, residual, weight


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_equals_all_reduce_then_the_norm_layer(dtype, with_residual):
    """The reference is what the unfused TP layers compute: the two ranks' sum (an all-reduce of two adds
    once, in the dtype), then RMSNorm(x, residual) as the decoder layer calls it."""
    from meshserve.kernels.triton_all_reduce_norm import all_reduce_rms_norm_ref
    from meshserve.layers.norm import RMSNorm

    parts, residual, weight = _case(5, 96, dtype)
    norm = RMSNorm(96, eps=1e-5).to(dtype)
    norm.weight.data.copy_(weight)
    total = parts[0] + parts[1]
    with torch.no_grad():
        want = norm(total, residual) if with_residual else (norm(total), total)
    got = all_reduce_rms_norm_ref(parts, residual if with_residual else None, weight, 1e-5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # and it is not the identity on one rank's share: the peer's part counts
    assert not torch.equal(got[1], parts[0] + residual if with_residual else parts[0])


def _rank0_of_two(x, peer, residual, weight, eps, push):
    """Run the kernel as rank 0 of two in this process: the peer's partial sums are already where we read
    them (pull: its buffer; push: slot 1 of ours) and its signal already in our pad (so our barrier passes at
    once). Returns the outputs, both buffers and both signal pads after the call."""
    from meshserve.kernels.triton_all_reduce_norm import MAX_PROGRAMS, all_reduce_rms_norm

    rows, n = x.numel() // x.shape[-1], x.numel()
    # each buffer sits 8 elements into its allocation, as a symmetric buffer may (buffer_offset)
    allocs = [torch.zeros(8 + 2 * n, dtype=x.dtype) for _ in range(2)]
    bufs = [a[8:] for a in allocs]
    if push:
        bufs[0][n:] = peer.reshape(-1)
    else:
        bufs[1][:n] = peer.reshape(-1)
    pads = [torch.zeros(2 * MAX_PROGRAMS, dtype=torch.int32) for _ in range(2)]
    pads[0][1::2][: min(rows, MAX_PROGRAMS)] = 1  # slot program * 2 + peer: the peer arrived
    buffer_ptrs = torch.tensor([a.data_ptr() for a in allocs], dtype=torch.int64)
    pad_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64)
    out, res_out = all_reduce_rms_norm(
        x, residual, weight, eps, buffer_ptrs.data_ptr(), 8, pad_ptrs.data_ptr(), 0, 2, push
    )
    assert not allocs[0][:8].any() and not allocs[1][:8].any()  # nothing before the buffers
    return out, res_out, bufs, pads


def _rows_cases():
    """rows x with_residual x push; 40 rows > MAX_PROGRAMS: programs loop over rows (~2 s of interpreter a case),
    by default with and without the residual and over push and pull each once, all four pairs with -m slow."""
    for with_residual in (True, False):
        for rows in (1, 3, 40):
            for push in (False, True):
                slow = rows == 40 and push != with_residual
                yield pytest.param(rows, with_residual, push, id=f"{with_residual}-{rows}-{'push' if push else 'pull'}",
                                   marks=pytest.mark.slow if slow else ())


@interp
@pytest.mark.parametrize(("rows", "with_residual", "push"), list(_rows_cases()))
def test_kernel_matches_reference_interp(rows, with_residual, push):
    """fp16 and fp32 (the interpreter rounds to bf16 by truncation: bf16 is left to the GPU test)."""
    from meshserve.kernels.triton_all_reduce_norm import MAX_PROGRAMS, all_reduce_rms_norm_ref

    for dtype in (torch.float16, torch.float32):
        (x, peer), residual, weight = _case(rows, 72, dtype, seed=rows)
        residual = residual if with_residual else None
        out, res_out, bufs, pads = _rank0_of_two(x, peer, residual, weight, 1e-6, push)
        want_out, want_res = all_reduce_rms_norm_ref([x, peer], residual, weight, 1e-6)
        assert torch.equal(res_out, want_res)  # no reduction inside: the same bits
        # the norm's statistics: up to the last bit of the fp32 sum's order
        tol = {torch.float16: 1e-3, torch.float32: 1e-6}[dtype]
        torch.testing.assert_close(out, want_out, rtol=tol, atol=tol)
        n = x.numel()
        assert torch.equal(bufs[0][:n], x.reshape(-1))  # our share in slot 0 of our buffer
        # push: and in slot 0 of the peer's (pull leaves the peer's buffer alone)
        assert torch.equal(bufs[1][:n], x.reshape(-1) if push else peer.reshape(-1))
        used = min(rows, MAX_PROGRAMS)
        assert not pads[0].any()  # the peer's signals consumed: the pad is back to zeros
        assert pads[1][0::2][:used].eq(1).all() and not pads[1][0::2][used:].any() and not pads[1][1::2].any()


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_all_reduce_norm import _all_reduce_rms_norm_kernel as kernel

names = list(kernel.arg_names)
for dt, rank, world, residual, block, push in (("bf16", 0, 2, True, 4096, False), ("bf16", 1, 2, False, 4096, False),
                                               ("bf16", 1, 2, True, 4096, True), ("fp16", 3, 4, True, 8192, True),
                                               ("fp32", 0, 2, True, 1024, False)):
    ptrs = {n: "*" + dt for n in ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr")}
    const = dict(RANK=rank, WORLD=world, HAS_RESIDUAL=residual, BLOCK=block, PUSH=push)
    sig = {n: "constexpr" if n in const else ptrs.get(n, "fp32" if n == "eps" else
                                                       "i64" if n.endswith("_ptrs") else "i32") for n in names}
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": min(16, block // 256)}).asm["ptx"]
    # the barrier: release CAS to each peer, acquire CAS on our pad, system scope; peers read uncached
    assert ptx.count("atom.global.release.sys.cas.b32") == world - 1, ptx
    assert ptx.count("atom.global.acquire.sys.cas.b32") == world - 1
    assert "ld.global.cv" in ptx
print("compiled")
"""


@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernel for the real device")
def test_kernel_compiles_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


def _gpu_rank(rank: int, port: int, failures) -> None:
    import torch.distributed as dist

    from meshserve.distributed.symm_mem_all_reduce import try_symm_mem_all_reduce
    from meshserve.kernels.triton_ops import rms_norm

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank, device_id=device
    )
    try:
        fast = try_symm_mem_all_reduce(dist.group.WORLD, device, torch.bfloat16)
        assert fast is not None and fast.fusable_norm
        for rows, hidden in ((1, 4096), (3, 4096), (64, 4096), (1, 1024), (2, 5120)):
            (x0, x1), residual, weight = _case(rows, hidden, torch.bfloat16, seed=rows + hidden)
            x = (x0 if rank == 0 else x1).to(device)
            residual, weight = residual.to(device), weight.to(device)
            for res, push in ((residual, False), (None, False), (residual, True), (None, True)):
                with fast.forward_scope():  # three calls: the parity and the closing barrier too
                    assert fast.can_fuse_rms_norm(x, res, weight, push)
                    outs = [fast.all_reduce_rms_norm(x, res, weight, 1e-5, push) for _ in range(3)]
                total = x.clone()
                dist.all_reduce(total)
                want = (
                    rms_norm(total, weight, 1e-5, res)
                    if res is not None
                    else (rms_norm(total, weight, 1e-5), total)
                )
                for out, res_out in outs:
                    # two bf16 summands: fp32-then-round equals NCCL's bf16 add; the norm rounds as rms_norm
                    assert torch.equal(res_out, want[1]), (rows, hidden)
                    torch.testing.assert_close(out, want[0], rtol=1.6e-2, atol=1e-2)
                gathered = [torch.empty_like(outs[0][1]) for _ in range(2)]
                dist.all_gather(gathered, outs[0][1])
                assert torch.equal(gathered[0], gathered[1])  # every rank keeps the same residual bits
        # captured in a CUDA graph (7 calls: both buffers and the closing barrier) and replayed: the signal
        # pads must return to zero after every barrier. Each call sums both ranks' y and adds 1: after the
        # first call y is the same on both ranks, so y = 2 (0.5 + 1.5) + 1 = 3, then 2y + 1: 7, ..., 255
        x = torch.full((1, 4096), 0.5 + rank, dtype=torch.bfloat16, device=device)
        ones = torch.ones(1, 4096, dtype=torch.bfloat16, device=device)
        weight = torch.ones(4096, dtype=torch.bfloat16, device=device)
        for push in (False, True):
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph), fast.forward_scope():
                y = x
                for i in range(7):
                    _, y = fast.all_reduce_rms_norm(y, ones, weight, 1e-5, push and i % 2 == 0)  # mixed too
            for _ in range(5):
                y.zero_()
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(y, torch.full_like(y, 255.0)), push
        dist.barrier()
    except Exception as e:
        failures.append(f"rank {rank}: {e!r}")
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_fused_kernel_equals_nccl_all_reduce_then_rms_norm_two_gpus():
    import torch.multiprocessing as mp

    from meshserve.distributed.launch import free_port

    failures = mp.Manager().list()
    mp.spawn(_gpu_rank, args=(free_port(), failures), nprocs=2)
    assert not list(failures)
