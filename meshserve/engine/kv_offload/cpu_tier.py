"""The CPU tier: KV blocks in (pinned) host memory, found by their prefix-cache hash, evicted least recently used.

One slot holds one block of every layer of this rank: [num_layers, 2, block_size, num_kv_heads, head_dim] in the
KV cache dtype, contiguous, so a block moves to and from the GPU (and to a disk file) as one piece. A slot is
free, cached (in the LRU under its hash) or reserved (a swapped-out sequence's, never evicted).

Slots are touched from two sides: the runner's copies (queued on a CUDA stream, ordered among themselves) and
the host (writing a block read from disk, reading one to spill to disk). The host side never touches a slot
that an op not yet launched names (`pending`), and waits on a launched copy's event (`events`) first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


class CPUTier:
    """Host slots for KV blocks, an LRU index hash -> slot, and the bookkeeping that keeps host and copies apart.

    `on_evict(hash, slot)` is called before a cached slot is reused, while it still holds the block (the
    manager spills it to disk there).
    """

    def __init__(self, num_slots: int, block_shape: tuple[int, ...], dtype: torch.dtype, pin_memory: bool):
        if num_slots < 1:
            raise ValueError("the CPU tier needs room for at least one block")
        self.num_slots = num_slots
        # not zeroed (pinning tens of GiB is slow enough): a slot is read only after a block was copied in
        self.tensor = torch.empty((num_slots, *block_shape), dtype=dtype, pin_memory=pin_memory)
        self.block_bytes = self.tensor[0].numel() * self.tensor.element_size()
        self.free: deque[int] = deque(range(num_slots))
        self.lru: OrderedDict[bytes, int] = OrderedDict()
        self.pending: set[int] = set()  # slots named by ops not launched yet: the host keeps off them
        self.busy: set[int] = set()  # slots a disk write reads in the background: never handed out meanwhile
        self.events: dict[int, Any] = {}  # slot -> CUDA event of the last launched copy that touches it
        # GPU block id -> the event of its launched store (copy_stream.py): the block manager hands the block
        # out again only once it fired (the manager pops it)
        self.store_events: dict[int, Any] = {}
        # slot -> crc32 of the block last copied in (debug mode); the runner sets it when a store runs
        self.checksums: dict[int, int] = {}
        self.on_evict: Callable[[bytes, int], None] | None = None

    # -- the index -------------------------------------------------------------------------------
    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self.lru

    def __len__(self) -> int:
        return len(self.lru)

    def lookup(self, block_hash: bytes) -> int | None:
        """The slot caching block_hash (now the most recently used), or None."""
        slot = self.lru.get(block_hash)
        if slot is not None:
            self.lru.move_to_end(block_hash)
        return slot

    def insert(self, block_hash: bytes, slot: int) -> None:
        self.lru[block_hash] = slot

    def allocate(self, host_write: bool = False) -> int | None:
        """A slot to fill: a free one, else the least recently used cached one that no pending op names
        (on_evict is told first). host_write: the host writes it now, so it must not be pending either. A busy
        slot (a disk write is reading it) is never given.
        None when nothing can be given."""
        for i, slot in enumerate(self.free):
            if not (host_write and slot in self.pending) and slot not in self.busy:
                del self.free[i]
                return slot
        for block_hash, slot in self.lru.items():
            if slot not in self.pending and slot not in self.busy:
                del self.lru[block_hash]
                if self.on_evict is not None:
                    self.on_evict(block_hash, slot)
                return slot
        return None

    def release(self, slot: int) -> None:
        """Give a reserved slot back (its content is dropped)."""
        self.free.append(slot)

    def clear(self) -> None:
        """Forget every cached block (reserved slots stay)."""
        for slot in self.lru.values():
            self.release(slot)
        self.lru.clear()

    # -- host access -----------------------------------------------------------------------------
    def wait(self, slot: int) -> None:
        """Block until the launched copies that touch slot are done."""
        event = self.events.pop(slot, None)
        if event is not None:
            event.synchronize()

    def slot_bytes(self, slot: int) -> np.ndarray:
        """The slot's block as a uint8 view (call wait(slot) first)."""
        return self.tensor[slot].reshape(-1).view(torch.uint8).numpy()

    def write_slot(self, slot: int, payload: bytes) -> None:
        """Fill slot from a block's bytes (call wait(slot) first)."""
        self.slot_bytes(slot)[:] = np.frombuffer(payload, dtype=np.uint8)
