"""The small-message all-reduce of tensor parallelism: one-shot over torch symmetric memory.

A batch-1 decode step all-reduces a few KB twice per layer. NCCL pays ~10-20 us of protocol for each, which
at TP = 2 is as long as the layer's own math; a one-shot all-reduce over peer-mapped memory (each rank copies
its input into its symmetric buffer, one barrier, then every rank reads all peers' buffers and sums) costs
one barrier and one NVLink read. It is captured inside the decode CUDA graphs like any other kernel. Above
`max_bytes` (large prefills) NCCL's bandwidth-optimal ring wins and serves instead.

torch's one-shot kernel has a barrier before the reads and none after, so a rank may start writing call
i+1's input while a peer still reads call i's: calls alternate between two buffers, and a forward that made
an odd number of calls ends with one barrier, so the next forward can start again on buffer 0 (CUDA graphs
replay the same sequence, so the parity must be fixed per forward, not carried across them).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# one-shot reads every peer's whole message: on two H200s it beat NCCL at every size measured, 1.7-1.9x at
# 8-64 KiB and 1.6x at 2 MiB (BENCHMARKS.md); larger messages (long prefills) keep NCCL's ring until measured
DEFAULT_MAX_BYTES = 2 * 1024 * 1024


class SymmMemAllReduce:
    """One-shot all-reduce of `dtype` tensors up to max_bytes over a TP group's symmetric memory.

    Holds two symmetric buffers and the call count of the current forward. Promises: all_reduce(x) equals
    dist.all_reduce(x) up to summation order, for every x that can_reduce(x) accepts; every rank of the
    group must make the same calls in the same order (as TP layers do).
    """

    def __init__(self, group, device: torch.device, dtype: torch.dtype, max_bytes: int = DEFAULT_MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        self.dtype, self.max_bytes = dtype, max_bytes
        self.group_name = group.group_name
        numel = max_bytes // dtype.itemsize
        self.buffers = [symm_mem.empty(numel, dtype=dtype, device=device) for _ in range(2)]
        self.handles = [symm_mem.rendezvous(b, group) for b in self.buffers]
        self.calls = 0
        # the fused kernel addresses each rank's buffer through the handle's table of allocation starts; a
        # symmetric buffer sits at the same offset into every rank's allocation
        self.offsets = [_offset(h, b) for h, b in zip(self.handles, self.buffers, strict=True)]
        self.fusable_norm = all(off is not None for off in self.offsets)

    def can_reduce(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (x.is_cuda and x.dtype == self.dtype and x.is_contiguous() and 0 < nbytes <= self.max_bytes
                and nbytes % 16 == 0)  # the kernel moves 16-byte vectors

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffers[self.calls % 2][: x.numel()]
        self.calls += 1
        out = torch.empty_like(x)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf, x.view(-1), "sum", self.group_name, out.view(-1))
        return out

    def can_fuse_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                          push: bool = False) -> bool:
        """Whether all_reduce_rms_norm takes these (the Triton kernel imports and fits them; push puts every
        rank's message in every buffer, so it takes messages up to max_bytes / world)."""
        mod = _fused_norm_kernels()
        if not (self.fusable_norm and mod is not None and self.can_reduce(x) and mod.fits(x, residual, weight)):
            return False
        return not push or x.numel() * x.element_size() * self.handles[0].world_size <= self.max_bytes

    def all_reduce_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                            eps: float, push: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(all_reduce(x) + residual), all_reduce(x) + residual) in one kernel
        (kernels/triton_all_reduce_norm.py: pull reads the peers' buffers, push writes into them), on the same
        buffers and call parity as all_reduce."""
        i = self.calls % 2
        self.calls += 1
        h = self.handles[i]
        return _fused_norm_kernels().all_reduce_rms_norm(x, residual, weight, eps, h.buffer_ptrs_dev, self.offsets[i],
                                                         h.signal_pad_ptrs_dev, h.rank, h.world_size, push)

    @contextlib.contextmanager
    def forward_scope(self):
        """Around one model forward (eager or captured): start on buffer 0, end with a barrier when the
        forward made an odd number of calls (its last call used buffer 0 too)."""
        self.calls = 0
        yield
        if self.calls % 2:
            self.handles[0].barrier()
        self.calls = 0


def _offset(handle, buffer: torch.Tensor) -> int | None:
    """buffer's offset in elements into this rank's allocation of handle, or None where the fused kernel
    cannot address it (an older handle without the device tables, a start that is not 16-byte aligned)."""
    if not all(hasattr(handle, n) for n in ("buffer_ptrs", "buffer_ptrs_dev", "signal_pad_ptrs_dev")):
        return None
    nbytes = buffer.data_ptr() - handle.buffer_ptrs[handle.rank]
    return nbytes // buffer.element_size() if nbytes >= 0 and nbytes % 16 == 0 else None


@functools.cache
def _fused_norm_kernels():
    try:
        from meshserve.kernels import triton_all_reduce_norm
    except ImportError:  # no Triton: the all-reduce and the norm stay two kernels
        return None
    return triton_all_reduce_norm


def try_symm_mem_all_reduce(group, device: torch.device, dtype: torch.dtype,
                            max_bytes: int = DEFAULT_MAX_BYTES) -> SymmMemAllReduce | None:
    """The one-shot all-reduce for this TP group, or None (logged) where symmetric memory is unavailable:
    an older torch, no peer access between the GPUs, a dtype the kernel lacks."""
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
        logger.info("tensor parallel all-reduce: NCCL (this torch has no symmetric-memory one-shot all-reduce)")
        return None
    comm, why = None, ""
    try:
        comm = SymmMemAllReduce(group, device, dtype, max_bytes)
    except Exception as e:  # noqa: BLE001  (any failure leaves NCCL serving, which is always correct)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    if _agreed(comm is not None, group, device):  # every rank built it: check one sum (16 bytes)
        got = comm.all_reduce(torch.ones(8, dtype=dtype, device=device))
        if not _agreed(bool((got == float(dist.get_world_size(group))).all()), group, device):
            comm, why = None, "the probe all-reduce gave a wrong sum"
    else:
        comm, why = None, why or "another rank could not set it up"
    if comm is None:
        logger.warning("tensor parallel all-reduce: NCCL (symmetric memory unavailable: %s)", why)
        return None
    comm.calls = 0
    # every rank must take the fused kernel for the same calls (a rank alone in its barrier waits forever)
    comm.fusable_norm = _agreed(comm.fusable_norm, group, device)
    logger.info("tensor parallel all-reduce: one-shot symmetric memory up to %d KiB, NCCL above",
                max_bytes // 1024)
    return comm


def _agreed(ok: bool, group, device: torch.device) -> bool:
    """Whether ok holds on every rank of the group."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())
