"""The scheduler's side of KV offload: which blocks move between the GPU, the CPU tier and the disk tier.

The block manager calls it at three points: a GPU block whose cached content is evicted (copy it down), a
prefix lookup that runs out of GPU hits (look below and load hits into fresh GPU blocks), and a preemption
(swap the sequence's blocks out, and back in when it is admitted again). Moves between the GPU and the CPU
tier become ops, in order, that the next step carries to the runner (transfer.py), which runs them before
that step's forward; moves between the CPU tier and the disk happen here, on the host, in the background.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

from meshserve.engine.kv_offload.cpu_tier import CPUTier
from meshserve.engine.kv_offload.disk_tier import DiskTier

logger = logging.getLogger(__name__)

PREEMPTION_MODES = ("recompute", "swap", "auto")

# One op: ("store", gpu block id, cpu slot) or ("load", cpu slot, gpu block id).
Transfer = tuple[str, int, int]


@dataclass
class KVOffloadStats:
    """Counters since start (blocks and bytes per tier; restores timed on the device by the runner)."""

    cpu_hits: int = 0  # prefix blocks restored from the CPU tier
    disk_hits: int = 0  # prefix blocks restored from the disk tier
    cpu_bytes_stored: int = 0  # GPU -> CPU (evicted prefix blocks and swap-outs)
    cpu_bytes_loaded: int = 0  # CPU -> GPU (restores and swap-ins)
    disk_bytes_written: int = 0
    disk_bytes_read: int = 0
    disk_errors: int = 0  # files found truncated, corrupted or foreign (at start or when read): misses
    restores: int = 0  # batches of CPU -> GPU copies timed
    restore_s: float = 0.0  # their device time in all
    swaps_out: int = 0
    swaps_in: int = 0
    cpu_blocks: int = 0  # cached in the CPU tier now
    disk_blocks: int = 0  # kept on disk now
    link_bytes_per_s: float = 0.0  # host <-> device copy rate measured (0: not yet)

    def as_dict(self) -> dict:
        return {f"kv_offload_{f.name}": getattr(self, f.name) for f in fields(self)}


class KVOffloadManager:
    """Tier bookkeeping for one engine (one rank: the runner shares its CPUTier object)."""

    def __init__(self, cpu: CPUTier, disk: DiskTier | None, preemption_mode: str = "recompute",
                 default_link_bytes_per_s: float = 25e9):
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}")
        self.cpu = cpu
        self.disk = disk
        self.preemption_mode = preemption_mode
        self.default_link_bytes_per_s = default_link_bytes_per_s
        self.stats = KVOffloadStats()
        self.ops: list[Transfer] = []
        self.swapped: dict[str, list[int]] = {}  # seq id -> its reserved slots, block order
        cpu.on_evict = self._spill

    @property
    def block_bytes(self) -> int:
        return self.cpu.block_bytes

    def take_transfers(self) -> list[Transfer]:
        """The ops for the step being scheduled (the runner launches them before its forward)."""
        ops, self.ops = self.ops, []
        self.cpu.pending.clear()
        return ops

    def _op(self, kind: str, a: int, b: int, slot: int) -> None:
        self.ops.append((kind, a, b))
        self.cpu.pending.add(slot)

    # -- GPU eviction: copy down -----------------------------------------------------------------
    def on_gpu_evict(self, block_id: int, block_hash: bytes) -> None:
        """A cached GPU block is about to be reused: keep its content in the CPU tier."""
        if self.cpu.lookup(block_hash) is not None:
            return
        slot = self.cpu.allocate()
        if slot is None:  # every slot reserved or in flight: the block is lost (recomputed if needed)
            return
        self._op("store", block_id, slot, slot)
        self.cpu.insert(block_hash, slot)
        self.stats.cpu_bytes_stored += self.block_bytes

    def _spill(self, block_hash: bytes, slot: int) -> None:
        """The CPU tier evicts a block: write it to disk (unless it is there already)."""
        if self.disk is None or block_hash in self.disk:
            return
        self.cpu.wait(slot)
        payload = self.cpu.slot_bytes(slot).tobytes()  # the slot is refilled next: the write gets a copy
        if self.disk.put(block_hash, payload):
            self.stats.disk_bytes_written += len(payload)

    # -- prefix lookup: restore ------------------------------------------------------------------
    def find(self, block_hashes: list[bytes]) -> list[tuple[bytes, int, str]]:
        """The leading blocks of block_hashes found below the GPU, each now in a CPU slot: (hash, slot, tier).
        Disk blocks are read (in parallel, checked) into fresh CPU slots; the run stops at the first block
        that is in neither tier, that finds no free slot, or whose file is bad."""
        chain: list[tuple[bytes, str]] = []
        for block_hash in block_hashes:
            if block_hash in self.cpu:
                chain.append((block_hash, "cpu"))
            elif self.disk is not None and block_hash in self.disk:
                chain.append((block_hash, "disk"))
            else:
                break
        for block_hash, tier in chain:  # CPU hits first: pending, so making room for disk reads spares them
            if tier == "cpu":
                self.cpu.pending.add(self.cpu.lookup(block_hash))
        found: list[tuple[bytes, int, str]] = []
        reads: list[tuple[int, bytes, int]] = []  # (index in found, hash, slot)
        for block_hash, tier in chain:
            if tier == "cpu":
                slot = self.cpu.lru[block_hash]
            else:
                slot = self.cpu.allocate(host_write=True)
                if slot is None:
                    break
                self.cpu.wait(slot)
                self.cpu.pending.add(slot)
                reads.append((len(found), block_hash, slot))
            found.append((block_hash, slot, tier))
        if reads:
            found = self._read_from_disk(found, reads)
        return found

    def _read_from_disk(self, found: list[tuple[bytes, int, str]],
                        reads: list[tuple[int, bytes, int]]) -> list[tuple[bytes, int, str]]:
        """Fill the slots of the disk blocks in found; cut found at the first bad file."""
        crcs = self.disk.read_many([(h, self.cpu.slot_bytes(slot)) for _, h, slot in reads])
        cut = len(found)
        for (i, block_hash, slot), crc in zip(reads, crcs):
            self.disk.record_read(block_hash, crc is not None)
            if crc is None:
                self.cpu.release(slot)
                cut = min(cut, i)
                continue
            self.cpu.checksums[slot] = crc  # what the copy to the GPU must reproduce (debug mode checks it)
            self.cpu.insert(block_hash, slot)  # a good block, kept even past a cut
            self.stats.disk_bytes_read += self.block_bytes
        return found[:cut]

    def load(self, found: list[tuple[bytes, int, str]], block_ids: list[int]) -> None:
        """Queue the copies of found blocks into these fresh GPU blocks (one each, in order)."""
        for (_, slot, tier), block_id in zip(found, block_ids):
            self._op("load", slot, block_id, slot)
            self.stats.cpu_bytes_loaded += self.block_bytes
            if tier == "cpu":
                self.stats.cpu_hits += 1
            else:
                self.stats.disk_hits += 1

    # -- preemption: swap ------------------------------------------------------------------------
    def link_bytes_per_s(self) -> float:
        return self.stats.link_bytes_per_s or self.default_link_bytes_per_s

    def should_swap(self, num_blocks: int, recompute_s: Callable[[], float]) -> bool:
        """swap: always; recompute: never; auto: when moving the blocks out and back is predicted to take
        less than recomputing their tokens (the step-time model's prefill time)."""
        if self.preemption_mode == "recompute" or num_blocks == 0:
            return False
        if self.preemption_mode == "swap":
            return True
        move_s = 2 * num_blocks * self.block_bytes / self.link_bytes_per_s()
        return move_s < recompute_s()

    def swap_out(self, seq_id: str, block_ids: list[int]) -> bool:
        """Copy a preempted sequence's blocks to reserved CPU slots; False (nothing reserved) when the CPU
        tier cannot hold them."""
        slots = []
        for _ in block_ids:
            slot = self.cpu.allocate()
            if slot is None:
                for s in slots:
                    self.cpu.release(s)
                return False
            slots.append(slot)
        for block_id, slot in zip(block_ids, slots):
            self._op("store", block_id, slot, slot)
        self.swapped[seq_id] = slots
        self.stats.swaps_out += 1
        self.stats.cpu_bytes_stored += len(slots) * self.block_bytes
        return True

    def swap_in(self, seq_id: str, block_ids: list[int]) -> None:
        """Queue the copies of a swapped sequence's blocks into its new GPU blocks and free its slots
        (a slot is refilled only by a later op, or by the host once this one has run)."""
        slots = self.swapped.pop(seq_id)
        assert len(block_ids) >= len(slots), "a swapped sequence resumes with at least its blocks"
        for slot, block_id in zip(slots, block_ids):
            self._op("load", slot, block_id, slot)
            self.cpu.release(slot)
        self.stats.swaps_in += 1
        self.stats.cpu_bytes_loaded += len(slots) * self.block_bytes

    def drop_swap(self, seq_id: str) -> None:
        """A swapped sequence ended (aborted) before resuming."""
        for slot in self.swapped.pop(seq_id, []):
            self.cpu.release(slot)

    # -- stats and shutdown ----------------------------------------------------------------------
    def snapshot(self) -> KVOffloadStats:
        self.stats.cpu_blocks = len(self.cpu)
        self.stats.disk_blocks = len(self.disk) if self.disk is not None else 0
        self.stats.disk_errors = self.disk.num_errors if self.disk is not None else 0
        return self.stats

    def close(self, gpu_cached: dict | None = None, run: Callable[[list[Transfer]], None] | None = None) -> None:
        """Keep everything for the next start: the GPU's cached blocks (gpu_cached: hash -> Block, copied by
        run, the runner's transfer engine) and the CPU tier's go to disk; then wait for the disk."""
        if self.disk is None:
            return
        t0 = time.perf_counter()
        run = run or (lambda ops: None)
        run(self.take_transfers())  # ops of a step never launched (the engine stops between steps)
        batch = max(1, self.cpu.num_slots // 2)
        for block_hash, block in list((gpu_cached or {}).items()):
            if block_hash in self.disk:
                continue
            self.on_gpu_evict(block.block_id, block_hash)  # may spill older CPU blocks to make room
            if len(self.ops) >= batch:
                run(self.take_transfers())
        run(self.take_transfers())
        for block_hash, slot in list(self.cpu.lru.items()):
            self._spill(block_hash, slot)
        self.disk.close()
        logger.info("KV disk tier: %d blocks kept in %s (%.1f s to flush)", len(self.disk), self.disk.dir,
                    time.perf_counter() - t0)
