"""The TP all-reduce, the residual add and the next RMSNorm in one Triton kernel over torch symmetric memory.

A tensor-parallel decoder layer ends its attention and its MLP with a row-parallel projection whose partial
sums are all-reduced, added to the residual stream and normed for the next projection: a one-shot all-reduce
kernel, then the add + RMSNorm kernel, each paying a launch and a pass over the row. Here one kernel does
both: each program copies its rows of this rank's partial sums into this rank's symmetric buffer, meets the
same program on every peer at a barrier on the signal pads, then reads every rank's buffer for its rows,
sums them, adds the residual, writes the new residual and the normed row (pull). With PUSH each program
instead writes its rows into slot `rank` of every rank's buffer (NVLink stores, posted), meets the peers,
then reads all slots from its own memory: one NVLink round trip fewer per call, a buffer of world x the
message (both variants opt-in until measured on two H200s).

Synchronisation is torch symmetric memory's own (the one_shot_all_reduce kernel and handle.barrier use the
same slots the same way): program p of rank r signals slot `p * world + r` of each peer's signal pad by a
compare-and-swap 0 -> 1 (release, system scope: retried while the peer has not consumed the previous
signal) and consumes `p * world + q` of its own pad for each peer q by 1 -> 0 (acquire), so the pads return
to zero after every barrier and the kernel replays from CUDA graphs. There is no barrier after the reads:
like SymmMemAllReduce's one-shot calls, consecutive calls alternate between two buffers (the caller picks).

Summation is fp32 in rank order on every rank, so all ranks get the same bits (the residual stream each rank
keeps must not drift apart); the sum is rounded to the input dtype (what an all-reduce returns) before the
residual add, and the add and norm round as triton_ops.rms_norm does.

all_reduce_rms_norm_ref is the reference with the same semantics on a list of the ranks' partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.triton_ops import rms_norm_ref

MAX_PROGRAMS = 32  # torch symmetric memory's signal pads hold 32 channels (symm_max_nblocks) per peer
MAX_COLS = 16384  # one program holds a whole row in registers


def all_reduce_rms_norm_ref(
    parts: list[torch.Tensor], residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(sum + residual), sum + residual) where sum is the parts added in fp32 in rank order and
    rounded to their dtype; without a residual (rms_norm(sum), sum)."""
    total = parts[0].float()
    for p in parts[1:]:
        total = total + p.float()
    total = total.to(parts[0].dtype)
    if residual is None:
        return rms_norm_ref(total, weight, eps), total
    return rms_norm_ref(total, weight, eps, residual)


@triton.jit
def _block_barrier(signal_pad_ptrs, channel, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Meet program `channel` of every peer (scalar atomics: Triton issues them from one thread)."""
    pads = signal_pad_ptrs.to(tl.pointer_type(tl.uint64))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            peer_pad = tl.load(pads + peer).to(tl.pointer_type(tl.int32))
            while tl.atomic_cas(peer_pad + channel * WORLD + RANK, 0, 1, sem="release", scope="sys") != 0:
                pass
    own_pad = tl.load(pads + RANK).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            while tl.atomic_cas(own_pad + channel * WORLD + peer, 1, 0, sem="acquire", scope="sys") != 1:
                pass


# rows vary per step (one specialization for every batch, compiled at start-up); the tables are addresses
@triton.jit(do_not_specialize=["n_rows", "buffer_ptrs", "buffer_offset", "signal_pad_ptrs"])
def _all_reduce_rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    buffer_ptrs,
    buffer_offset,
    signal_pad_ptrs,
    n_rows,
    n_cols,
    eps,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PUSH: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = x_ptr.dtype.element_ty
    bufs = buffer_ptrs.to(tl.pointer_type(tl.uint64))
    # the buffer starts buffer_offset elements into each rank's allocation, 16-byte aligned
    own = tl.multiple_of(tl.load(bufs + RANK).to(tl.pointer_type(dtype)) + buffer_offset, 16)
    slot = n_rows * n_cols  # PUSH: rank r's rows at r * slot of every buffer (< 2^31: a few MiB)
    for row in range(pid, n_rows, programs):  # this program's rows of the partial sums, into the buffer(s)
        offs = row * n_cols + cols
        x = tl.load(x_ptr + offs, mask=mask)
        if PUSH:
            for q in tl.static_range(WORLD):
                dst = tl.multiple_of(tl.load(bufs + q).to(tl.pointer_type(dtype)) + buffer_offset, 16)
                tl.store(dst + RANK * slot + offs, x, mask=mask)
        else:
            tl.store(own + offs, x, mask=mask)
    tl.debug_barrier()  # every thread's copy is done before the release
    _block_barrier(signal_pad_ptrs, pid, RANK, WORLD)
    tl.debug_barrier()  # ... and the peers' copies are visible to every thread after the acquire
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    for row in range(pid, n_rows, programs):
        offs = row * n_cols + cols  # < 2^31: the buffer holds a few MiB
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):  # rank order on every rank: the same bits everywhere
            if PUSH:
                src = own + r * slot
            else:
                src = tl.multiple_of(tl.load(bufs + r).to(tl.pointer_type(dtype)) + buffer_offset, 16)
            acc += tl.load(src + offs, mask=mask, other=0.0, cache_modifier=".cv").to(tl.float32)
        h = acc.to(dtype)  # the all-reduce's result
        if HAS_RESIDUAL:
            r_in = tl.load(res_ptr + offs, mask=mask, other=0.0)
            h = (h.to(tl.float32) + r_in.to(tl.float32)).to(dtype)
        tl.store(res_out_ptr + offs, h, mask=mask)
        hf = h.to(tl.float32)
        var = tl.sum(hf * hf, 0) / n_cols
        normed = (hf * (1.0 / tl.sqrt(var + eps))).to(dtype)
        tl.store(out_ptr + offs, (w * normed.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def fits(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Whether the kernel takes these: contiguous rows of at most MAX_COLS 16/32-bit features on a GPU, the
    residual and the norm weight alike."""
    return (
        x.is_cuda
        and x.dim() >= 1
        and x.is_contiguous()
        and 0 < x.shape[-1] <= MAX_COLS
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and weight.dtype == x.dtype
        and weight.shape == x.shape[-1:]
        and weight.is_contiguous()
        and (
            residual is None
            or (residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous())
        )
    )


def all_reduce_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    buffer_ptrs_dev: int,
    buffer_offset: int,
    signal_pad_ptrs_dev: int,
    rank: int,
    world_size: int,
    push: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as all_reduce_rms_norm_ref over the ranks' x. buffer_ptrs_dev / signal_pad_ptrs_dev: the device
    tables of every rank's symmetric allocation and signal pad (a torch symmetric-memory handle's); the buffer
    starts buffer_offset elements into each allocation (16-byte aligned), holds x's size (world_size times
    that with push) and is read by no call still running; every rank calls with the same shapes and push."""
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    out = torch.empty_like(x)
    res_out = torch.empty_like(x)
    if rows == 0:
        return out, res_out
    block = triton.next_power_of_2(hidden)
    _all_reduce_rms_norm_kernel[(min(rows, MAX_PROGRAMS),)](
        x,
        x if residual is None else residual,
        weight,
        out,
        res_out,
        buffer_ptrs_dev,
        buffer_offset,
        signal_pad_ptrs_dev,
        rows,
        hidden,
        float(eps),
        RANK=rank,
        WORLD=world_size,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        PUSH=push,
        num_warps=min(16, max(1, block // 256)),
    )
    return out, res_out
