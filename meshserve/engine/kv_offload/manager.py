"""The scheduler's side of KV offload: which blocks move between the GPU, the CPU tier and the disk tier.

The block manager calls it at three points: a GPU block whose cached content is evicted (copy it down), a
prefix lookup that runs out of GPU hits (look below and load hits into fresh GPU blocks), and a preemption
(swap the sequence's blocks out, and back in when it is admitted again). Moves between the GPU and the CPU
tier become ops, in order, that the next step carries to the runner (transfer.py), which runs them on a copy
stream beside that step's forward. A GPU block being stored is "in flight" until its store's event fires
(`poll`, each step): the block manager does not hand it out meanwhile. Disk reads for a restore run on reader
threads: the request waits (`find` says so) and the engine loop goes on; `poll` files the blocks read (an idle
engine blocks in `wait_io` meanwhile). A block that lands in the CPU tier is written behind to disk from its slot
(`writing`: the slot is busy, never handed out, until the write is done), so a CPU eviction spills nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ALL_COMPLETED, Future, wait
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
    disk_errors: int = 0  # files found truncated, corrupted or foreign (at start or when read), or not written
    restores: int = 0  # batches of CPU -> GPU copies timed
    restore_s: float = 0.0  # their device time in all
    swaps_out: int = 0
    swaps_in: int = 0
    cpu_blocks: int = 0  # cached in the CPU tier now
    disk_blocks: int = 0  # kept on disk now
    link_bytes_per_s: float = 0.0  # host <-> device copy rate measured (0: not yet)
    store_failures: int = 0  # GPU blocks whose store raised (their slot forgotten; a swapped sequence recomputes)
    # runs of disk blocks not restored because reading them was predicted slower than recomputing, their blocks
    disk_restores_skipped: int = 0
    disk_blocks_skipped: int = 0
    disk_read_bytes_per_s: float = 0.0  # the disk tier's read throughput as estimated now (the seed until read)
    disk_reads: int = 0  # batches of block reads (restores, probes, the first measurement)
    disk_read_s: float = 0.0  # their wall time in all

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
        self.ops_after_forward: list[Transfer] = []  # write-through stores of the blocks the step's forward fills
        self.swapped: dict[str, list[int]] = {}  # seq id -> its reserved slots, block order
        # GPU block id -> (slot, hash of an evicted block or None, swapped sequence's id or None): stores issued
        # whose event has not fired yet (the block must not be written meanwhile)
        self.storing: dict[int, tuple[int, bytes | None, str | None]] = {}
        # disk reads on the reader threads: hash -> (slot, its batch's future, its index in the batch)
        self.reading: dict[bytes, tuple[int, Future, int]] = {}
        self._read_from_disk: set[bytes] = set()  # read back and not loaded yet: their restore is a disk hit
        self.probing: set[bytes] = set()  # reads no request waits for (they measure the disk: `_probe`)
        self._measuring: list[Future] = []  # the first measurement of the disk's read rate (`_measure_disk`)
        self.writing: dict[int, Future] = {}  # CPU slot -> its block's disk write (written behind, from the slot)
        # told (hash) when the CPU tier drops a block that no lower tier keeps: a GPU block still holding that
        # content must be copied down again before it is reused (block_manager.py)
        self.on_lost: Callable[[bytes], None] | None = None
        cpu.on_evict = self._spill
        if disk is not None:
            disk.on_evict = self._disk_evicted

    @property
    def block_bytes(self) -> int:
        return self.cpu.block_bytes

    def take_step_transfers(self) -> tuple[list[Transfer], list[Transfer]]:
        """The ops for the step being scheduled: (those the runner launches before its forward, those it
        launches after it)."""
        ops, self.ops = self.ops, []
        after, self.ops_after_forward = self.ops_after_forward, []
        self.cpu.pending.clear()
        return ops, after

    def take_transfers(self) -> list[Transfer]:
        """All queued ops in one list, in order (for callers that run them at once, with no forward between)."""
        before, after = self.take_step_transfers()
        return before + after

    def _op(self, kind: str, a: int, b: int, slot: int, after_forward: bool = False) -> None:
        (self.ops_after_forward if after_forward else self.ops).append((kind, a, b))
        self.cpu.pending.add(slot)

    # -- GPU eviction: copy down -----------------------------------------------------------------
    def on_gpu_evict(self, block_id: int, block_hash: bytes, after_forward: bool = False) -> bool:
        """A cached GPU block will be reused (or, after_forward, was just filled: written through): copy its
        content to the CPU tier. True when a store was queued (the block is in flight until `poll` reports it);
        False when there is nothing to wait for (the hash is below already, or no slot can be had: then the
        block is lost, recomputed if needed)."""
        if block_hash in self.cpu or (self.disk is not None and block_hash in self.disk):
            return False
        slot = self.cpu.allocate()
        if slot is None:
            return False
        self._op("store", block_id, slot, slot, after_forward)
        self.storing[block_id] = (slot, block_hash, None)
        self.cpu.insert(block_hash, slot)
        self.stats.cpu_bytes_stored += self.block_bytes
        return True

    def on_gpu_dropped(self, block_id: int, block_hash: bytes) -> None:
        """The GPU's copy of block_hash is overwritten now. A copy written through long before is the oldest in
        the CPU tier's LRU though it is now the only one: it counts as used now, so the CPU tier ages blocks by
        when the GPU let them go, not by when they were filled."""
        if block_hash in self.cpu:
            self.cpu.lookup(block_hash)

    def poll(self) -> tuple[list[int], list[int], list[str]]:
        """Each step, before scheduling: (GPU blocks whose store finished, those whose store failed, swapped
        sequences whose KV was lost with it: they recompute). Also files the disk reads that finished. Never
        waits; a store not launched yet is still in flight."""
        landed, failed, lost = [], [], []
        for block_id, (slot, block_hash, seq_id) in list(self.storing.items()):
            event = self.cpu.store_events.get(block_id)
            if event is None:
                continue
            try:
                if not event.query():
                    continue
                error = getattr(event, "error", None)
            except Exception as e:  # noqa: BLE001  an event that raises reports a failed copy
                error = e
            del self.storing[block_id]
            self.cpu.store_events.pop(block_id, None)
            if error is None:
                landed.append(block_id)
                if block_hash is not None:
                    self._write_behind(block_hash, slot)
                continue
            failed.append(block_id)
            self.stats.store_failures += 1
            logger.warning("KV offload: the store of GPU block %d failed (%s); its copy is dropped", block_id, error)
            if block_hash is not None and self.cpu.lru.get(block_hash) == slot:
                del self.cpu.lru[block_hash]
                self.cpu.checksums.pop(slot, None)
                self.cpu.release(slot)
            if seq_id is not None and seq_id in self.swapped:
                self.drop_swap(seq_id)
                lost.append(seq_id)
        if self.disk is not None:
            self.disk.reap()  # writes that failed (a full disk): those blocks are not on disk
        self._file_reads()
        self._measure_disk()
        for slot, future in list(self.writing.items()):  # disk writes done: their slots may be reused
            if future.done():
                del self.writing[slot]
                self.cpu.busy.discard(slot)
        return landed, failed, lost

    def _measure_disk(self) -> None:
        """Once the disk tier holds a block per reader thread, read them once in the background: the read rate
        is then measured before the first restore asks it (a conservative seed alone would make that restore,
        and every one after it, a recompute: a skipped restore measures nothing but its probe)."""
        disk = self.disk
        if disk is None or self._measuring or disk.read_rate.num_measured or len(disk) < disk.num_readers:
            return
        self._measuring = disk.measure(disk.num_readers)

    def _write_behind(self, block_hash: bytes, slot: int) -> None:
        """A block landed in the CPU tier: write it to disk now, in the background, straight from its slot (kept
        from reuse until written), so evicting it from the CPU tier later costs the engine thread nothing."""
        if self.disk is None or block_hash in self.disk or self.cpu.lru.get(block_hash) != slot:
            return
        future = self.disk.put(block_hash, self.cpu.slot_bytes(slot))
        if future is not None:
            self.cpu.busy.add(slot)
            self.writing[slot] = future
            self.stats.disk_bytes_written += self.block_bytes

    def swap_landed(self, seq_id: str) -> bool:
        """Every store of the sequence's swap-out has finished (it may resume: its slots hold its KV)."""
        return not any(s == seq_id for _, _, s in self.storing.values())

    def _spill(self, block_hash: bytes, slot: int) -> None:
        """The CPU tier evicts a block: write it to disk (unless it is there already)."""
        self._read_from_disk.discard(block_hash)
        if self.disk is not None and block_hash in self.disk:
            return
        if self.disk is not None:
            self.cpu.wait(slot)
            payload = self.cpu.slot_bytes(slot).tobytes()  # the slot is refilled next: the write gets a copy
            if self.disk.put(block_hash, payload):
                self.stats.disk_bytes_written += len(payload)
                return
        if self.on_lost is not None:
            self.on_lost(block_hash)

    def _disk_evicted(self, block_hash: bytes) -> None:
        if block_hash not in self.cpu and self.on_lost is not None:
            self.on_lost(block_hash)

    # -- prefix lookup: restore ------------------------------------------------------------------
    def find(self, block_hashes: list[bytes], recompute_s: Callable[[int, int], float | None] | None = None,
             ) -> tuple[list[tuple[bytes, int, str]], bool]:
        """The leading blocks of block_hashes found in the CPU tier: (hash, slot, tier the block came from),
        and whether more of the run is being read from disk (the caller waits for it rather than recompute).
        Disk blocks of the run start their reads (reader threads, into fresh CPU slots; `poll` files them),
        unless recompute_s(i, j), the predicted time to prefill blocks i..j-1 of block_hashes (None: unknown),
        says recomputing them is faster than reading them (the disk tier's measured read rate): then they are a
        miss, and a few of them are read in the background anyway (`_probe`)."""
        found: list[tuple[bytes, int, str]] = []
        for block_hash in block_hashes:
            slot = self.cpu.lookup(block_hash) if block_hash in self.cpu else None
            if slot is None:
                break
            tier = "disk" if block_hash in self._read_from_disk else "cpu"
            self.cpu.pending.add(slot)  # kept while room is made for disk reads and fresh GPU blocks
            found.append((block_hash, slot, tier))
        # the run after the CPU hits that the disk tier covers: blocks on disk, being read, or read already (a
        # later part of a read batch can land before an earlier one: it is not read twice)
        run: list[bytes] = []
        for block_hash in block_hashes[len(found) :]:
            if not (block_hash in self.reading or block_hash in self.cpu
                    or (self.disk is not None and block_hash in self.disk)):
                break
            run.append(block_hash)
        decided = any(h in self.reading and h not in self.probing for h in run)  # its restore runs already
        to_read = [h for h in run if h not in self.reading and h not in self.cpu]
        redo_s = recompute_s(len(found), len(found) + len(run)) if run and not decided and recompute_s else None
        if redo_s is not None and not self._read_pays(len(to_read), redo_s):
            self.stats.disk_restores_skipped += 1
            self.stats.disk_blocks_skipped += len(run)
            self._probe(to_read)
            return found, False
        self.probing.difference_update(run)  # a probe's reads in a restored run: the request waits for them
        reading = any(h in self.reading for h in run)
        slots: list[tuple[bytes, int]] = []
        for block_hash in to_read:
            slot = self.cpu.allocate(host_write=True)
            if slot is None:
                break
            self.cpu.wait(slot)
            slots.append((block_hash, slot))
            reading = True
        self._start_reads(slots)
        return found, reading

    def _read_pays(self, num_blocks: int, recompute_s: float) -> bool:
        """Reading num_blocks from disk is predicted faster than recomputing them (recompute_s). All or none of
        a run: reading costs the same per block while a later block costs more to recompute (its attention
        reads a longer prefix), so if reading any leading part of the run pays, reading all of it pays more."""
        return self.disk.read_rate.predict_s(num_blocks * self.disk.file_bytes) < recompute_s

    def _probe(self, block_hashes: list[bytes]) -> None:
        """A restore was skipped: read a few of its blocks anyway, one per reader thread, which nothing waits
        for, so the read rate is measured again (a skipped restore measures nothing; the disk may be faster
        now, its files in the page cache). They land in the CPU tier like any read: a later lookup hits them.
        One probe at a time."""
        if self.probing:
            return
        slots = []
        for block_hash in block_hashes[: self.disk.num_readers]:
            slot = self.cpu.allocate(host_write=True)
            if slot is None:
                break
            self.cpu.wait(slot)
            slots.append((block_hash, slot))
        self._start_reads(slots)
        self.probing.update(h for h, _ in slots)

    def _start_reads(self, slots: list[tuple[bytes, int]]) -> None:
        if slots:  # a few large read tasks (one per reader thread), not one per block: fewer wake-ups
            for part, future in self.disk.read_batches([(h, self.cpu.slot_bytes(s)) for h, s in slots]):
                for i in part:
                    self.reading[slots[i][0]] = (slots[i][1], future, i - part.start)

    def wait_io(self, timeout_s: float = 0.01) -> None:
        """A step had nothing to run: block (the GIL released) until the disk reads under way are done, or
        timeout_s. An engine loop that polled instead would keep the reader threads waiting for the GIL."""
        if self.reading:
            wait({f for _, f, _ in self.reading.values()}, timeout=timeout_s, return_when=ALL_COMPLETED)

    def _file_reads(self) -> None:
        """The disk reads that finished: a good block joins the CPU tier, a bad file is dropped (a miss)."""
        for block_hash, (slot, future, i) in list(self.reading.items()):
            if not future.done():
                continue
            del self.reading[block_hash]
            self.probing.discard(block_hash)
            try:
                crc = future.result()[i]
            except Exception as e:  # noqa: BLE001  a reader that raised: a miss, like a bad file
                logger.warning("KV disk tier: reading a block failed: %s", e)
                crc = None
            self.disk.record_read(block_hash, crc is not None)
            if crc is None or block_hash in self.cpu:  # a bad file; or the block came down again meanwhile
                self.cpu.release(slot)
                continue
            self.cpu.checksums[slot] = crc  # what the copy to the GPU must reproduce (debug mode checks it)
            self.cpu.insert(block_hash, slot)
            self._read_from_disk.add(block_hash)
            self.stats.disk_bytes_read += self.block_bytes

    def load(self, found: list[tuple[bytes, int, str]], block_ids: list[int]) -> None:
        """Queue the copies of found blocks into these fresh GPU blocks (one each, in order)."""
        for (block_hash, slot, tier), block_id in zip(found, block_ids):
            self._read_from_disk.discard(block_hash)
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
            self.storing[block_id] = (slot, None, seq_id)
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

    def trim_swap(self, seq_id: str, num_blocks: int) -> None:
        """A swapped sequence keeps only its first num_blocks slots: the rest held proposals that its verify
        step, in flight when it was swapped out, rejected (it resumes with blocks for its verified tokens)."""
        slots = self.swapped.get(seq_id, [])
        for slot in slots[num_blocks:]:
            self.cpu.release(slot)  # a store still running into it is ordered before any later copy
        del slots[num_blocks:]

    def drop_swap(self, seq_id: str) -> None:
        """A swapped sequence ended (aborted) before resuming, or its KV was lost."""
        for slot in self.swapped.pop(seq_id, []):
            self.cpu.release(slot)  # a store still running into it is ordered before any later copy

    # -- stats and shutdown ----------------------------------------------------------------------
    def snapshot(self) -> KVOffloadStats:
        self.stats.cpu_blocks = len(self.cpu)
        self.stats.disk_blocks = len(self.disk) if self.disk is not None else 0
        self.stats.disk_errors = self.disk.num_errors if self.disk is not None else 0
        if self.disk is not None:
            rate = self.disk.read_rate
            self.stats.disk_read_bytes_per_s, self.stats.disk_reads, self.stats.disk_read_s = (
                rate.bytes_per_s, rate.num_measured, rate.total_s)
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
