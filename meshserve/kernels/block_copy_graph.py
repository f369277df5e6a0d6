"""A whole read's block copy replayed from a CUDA graph: the ids' upload and the copy kernel in one replay.

Launching a read from Python was ~0.25 ms of host time on the H200's host (at 512 blocks, 2026-12-03: 0.16 ms for the
ids' packing and pinned upload, 0.10 ms for Triton's launch of copy_blocks), a quarter of a 1 GiB read. Here each
size bucket (a power of two of block pairs) captures once: a copy of a fixed pinned buffer [count, src ids, dst ids]
into a fixed device buffer, then copy_blocks over every layer with the bucket's capacity as its grid and the read's
pair count read on the device (programs past it copy nothing). A read packs its ids into its bucket's pinned
buffer and replays.

One instance per reader thread (its pinned buffers are rewritten by the thread's next read, which the ipc connector
starts only after the last one's copy ended), per pair of pools.
"""

from __future__ import annotations

import struct

import torch

from meshserve.kernels.triton_block_copy import PoolPointers, copy_blocks

MIN_PAIRS = 16  # the smallest bucket: a read of fewer blocks replays this one


def bucket(n: int) -> int:
    """The capacity a read of n pairs replays: the next power of two, at least MIN_PAIRS."""
    return max(MIN_PAIRS, 1 << (n - 1).bit_length())


class _Captured:
    """One bucket's graph and the buffers it reads: host (pinned) and dev hold [count, src ids..., dst ids...]."""

    def __init__(self, pointers: PoolPointers, capacity: int, device: torch.device):
        self.capacity = capacity
        self.host = torch.zeros(1 + 2 * capacity, dtype=torch.int64, pin_memory=True)
        self.dev = torch.zeros(1 + 2 * capacity, dtype=torch.int64, device=device)
        count, src, dst = self.dev[:1], self.dev[1 : 1 + capacity], self.dev[1 + capacity :]
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            copy_blocks(pointers, dst, src, pair_count=count)  # (compiles outside the capture; count 0: copies nothing)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the engine's own thread may launch work (never synchronize) while this one captures
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.dev.copy_(self.host, non_blocking=True)
                copy_blocks(pointers, dst, src, pair_count=count)
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)

    def replay(self, dst_ids: list[int], src_ids: list[int], src_blocks: int) -> None:
        n, buf = len(dst_ids), self.host.numpy()
        struct.pack_into(f"q{n}q", buf, 0, n, *src_ids)
        src = buf[1 : 1 + n]  # (checked as packed: numpy's min and max, ~8x faster than Python's on the list)
        if src.min() < 0 or src.max() >= src_blocks:
            raise IndexError(f"block id out of range (a pool of {src_blocks} blocks): {src_ids}")
        struct.pack_into(f"{n}q", buf, 8 * (1 + self.capacity), *dst_ids)
        self.graph.replay()


class BlockCopyGraphs:
    """dst[l][:, dst_ids] = src[l][:, src_ids] for every layer of two pools (PoolPointers), on the current stream,
    from a graph per size bucket captured at a bucket's first read (a few ms: its compile and capture)."""

    def __init__(self, pointers: PoolPointers, device: torch.device, src_blocks: int):
        self.pointers, self.device, self._src_blocks = pointers, device, src_blocks
        self._graphs: dict[int, _Captured] = {}

    def __call__(self, dst_ids: list[int], src_ids: list[int]) -> None:
        """Raises IndexError, copying nothing, where a src id is outside the src pool."""
        if not dst_ids:
            return
        capacity = bucket(len(dst_ids))
        graph = self._graphs.get(capacity)
        if graph is None:
            graph = self._graphs[capacity] = _Captured(self.pointers, capacity, self.device)
        graph.replay(dst_ids, src_ids, self._src_blocks)
