"""The runner's side of KV offload: runs a step's copies between the GPU KV pool and the CPU tier.

The copies go on a dedicated copy stream (copy_stream.py): it first waits for the compute work already queued
(the last writer of a block stored now, the last reader of a block loaded into), never for the forward queued
after it. Ops run in order (a slot may be stored and then loaded in one step). The compute stream waits only for
the loads (and whatever precedes the last load): the forward reads restored blocks. Stores after the last load
overlap the forward; a stored GPU block is not handed out again until its event (`cpu.store_events`) has fired,
which the block manager checks. A store that raises marks its blocks failed instead of stopping the engine:
the offload manager then forgets the slot (and a swapped-out sequence recomputes). On a CPU the same copies run
synchronously, in the same order.

A store gathers the blocks of every layer into one contiguous [n, layers, 2, block_size, heads, head_dim]
staging tensor, then copies runs of consecutive slots in one piece each; a load does the reverse. In debug
mode every copy is checked against a crc32: the GPU block's at store time must come back at load time.
"""

from __future__ import annotations

import logging
import time
import zlib

import torch

from meshserve.engine.kv_offload.copy_stream import CudaCopyStream, FailedCopy, SyncCopyStream
from meshserve.engine.kv_offload.cpu_tier import CPUTier
from meshserve.engine.kv_offload.manager import KVOffloadStats, Transfer

logger = logging.getLogger(__name__)

STAGING_BYTES = 256 << 20  # device memory for the contiguous staging copy of a batch of blocks


class KVChecksumError(RuntimeError):
    """A block restored from a lower tier is not the block stored (debug mode): a bug, never data served."""


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(start in the list, first slot, count) for each run of consecutive slots."""
    runs, i = [], 0
    while i < len(slots):
        j = i + 1
        while j < len(slots) and slots[j] == slots[j - 1] + 1:
            j += 1
        runs.append((i, slots[i], j - i))
        i = j
    return runs


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


class KVTransferEngine:
    """Executes Transfer ops between one rank's KV pool tensors and its CPUTier.

    stream: where the copies run (default: a CUDA copy stream on a GPU, synchronous on a CPU; tests pass a
    fake). trace: when a list, each run appends its copies' (start, end) timing events (the bench's overlap)."""

    def __init__(self, kv_tensors: list[torch.Tensor], cpu: CPUTier, stats: KVOffloadStats, verify: bool = False,
                 stream=None):
        self.kv_tensors = kv_tensors  # per layer [2, num_blocks, block_size, heads, head_dim]
        self.cpu = cpu
        self.stats = stats
        self.verify = verify
        self.device = kv_tensors[0].device
        if stream is None:
            stream = CudaCopyStream(self.device) if self.device.type == "cuda" else SyncCopyStream()
        self.stream = stream
        self.cuda = isinstance(stream, CudaCopyStream)  # device-timed loads
        self._timed: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []  # loads still being timed
        self.trace: list | None = None

    def run(self, ops: list[Transfer]) -> None:
        """Queue ops in order; the compute stream's next work waits for the loads among them only."""
        if not ops:
            return
        self._collect_timings()
        self.stream.after_compute()
        last_load = max((i for i, op in enumerate(ops) if op[0] == "load"), default=-1)
        failed: dict[int, BaseException] = {}  # GPU block -> why its store failed
        with self.stream.active():
            start = self.stream.record(timing=True) if self.trace is not None else None
            self._run_groups(ops[: last_load + 1], failed)
            ready = self.stream.record()
            done = ready
            if last_load + 1 < len(ops):
                self._run_groups(ops[last_load + 1 :], failed)
                done = self.stream.record(timing=self.trace is not None)
            if self.trace is not None:
                self.trace.append((start, done if done is not ready else self.stream.record(timing=True)))
        if last_load >= 0:
            self.stream.compute_waits(ready)  # the forward reads the restored blocks
        for i, (kind, a, b) in enumerate(ops):
            event = ready if i <= last_load else done
            if kind == "store":
                self.cpu.store_events[a] = FailedCopy(failed[a], event.stream) if a in failed else event
                self.cpu.events[b] = event
            else:
                self.cpu.events[a] = event

    def _run_groups(self, ops: list[Transfer], failed: dict[int, BaseException]) -> None:
        # consecutive ops of one kind go together (the order between kinds is kept), in chunks whose staging
        # tensor stays under STAGING_BYTES of device memory
        chunk = max(1, STAGING_BYTES // self.cpu.block_bytes)
        i = 0
        while i < len(ops):
            j = i
            while j < len(ops) and ops[j][0] == ops[i][0] and j - i < chunk:
                j += 1
            group = ops[i:j]
            if group[0][0] == "store":
                block_ids = [a for _, a, _ in group]
                try:
                    self._store(block_ids, [b for _, _, b in group])
                except Exception as e:  # noqa: BLE001  the blocks stay on the GPU; the manager forgets the slots
                    logger.warning("KV offload: storing GPU blocks %s failed: %s", block_ids, e)
                    failed.update(dict.fromkeys(block_ids, e))
            else:
                self._load([a for _, a, _ in group], [b for _, _, b in group])
            i = j

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        """block_ids on the device, copied on the current (copy) stream without the host waiting. A plain
        torch.tensor(ids, device=cuda) synchronizes the host with that stream, which waits for the compute
        queued before it: the host stalled until the forward ended, so the next step's forward (and its copies'
        overlap with it) started only once every copy queued before it was done."""
        cuda = self.device.type == "cuda"
        return torch.tensor(block_ids, dtype=torch.long, pin_memory=cuda).to(self.device, non_blocking=cuda)

    def _gather(self, block_ids: list[int]) -> torch.Tensor:
        """The blocks of every layer as one contiguous [n, layers, 2, block_size, heads, head_dim] tensor."""
        idx = self._index(block_ids)
        per_layer = torch.stack([t.index_select(1, idx) for t in self.kv_tensors])  # [L, 2, n, ...]
        return per_layer.permute(2, 0, 1, 3, 4, 5).contiguous()

    def _store(self, block_ids: list[int], slots: list[int]) -> None:
        staging = self._gather(block_ids)
        for start, slot, n in _runs(slots):
            self.cpu.tensor[slot : slot + n].copy_(staging[start : start + n], non_blocking=True)
        if self.verify:
            self._sync()
            for i, slot in enumerate(slots):
                expected = _crc(staging[i])
                if _crc(self.cpu.tensor[slot]) != expected:
                    raise KVChecksumError(f"GPU block {block_ids[i]} -> CPU slot {slot}: copy differs")
                self.cpu.checksums[slot] = expected

    def _load(self, slots: list[int], block_ids: list[int]) -> None:
        if self.verify:
            for slot in slots:
                expected = self.cpu.checksums.get(slot)
                if expected is not None and _crc(self.cpu.tensor[slot]) != expected:
                    raise KVChecksumError(f"CPU slot {slot} changed since its block was stored")
        t0 = time.perf_counter()
        start_ev = self.stream.record(timing=True).event if self.cuda else None
        staging = torch.empty((len(slots), *self.cpu.tensor.shape[1:]), dtype=self.cpu.tensor.dtype,
                              device=self.device)
        for start, slot, n in _runs(slots):
            staging[start : start + n].copy_(self.cpu.tensor[slot : slot + n], non_blocking=True)
        idx = self._index(block_ids)
        for layer, t in enumerate(self.kv_tensors):
            src = staging[:, layer].transpose(0, 1)
            if t.dtype == torch.float8_e4m3fn:  # an fp8 cache: CPU torch has no fp8 index_copy_, move the bytes
                t, src = t.view(torch.uint8), src.view(torch.uint8)
            t.index_copy_(1, idx, src)
        nbytes = len(slots) * self.cpu.block_bytes
        if self.cuda:
            end_ev = self.stream.record(timing=True).event
            self._timed.append((start_ev, end_ev, nbytes))
        else:
            self._account(time.perf_counter() - t0, nbytes)
        if self.verify:
            self._sync()
            got = self._gather(block_ids)
            for i, slot in enumerate(slots):
                expected = self.cpu.checksums.get(slot)
                if expected is not None and _crc(got[i]) != expected:
                    raise KVChecksumError(f"CPU slot {slot} -> GPU block {block_ids[i]}: restored block differs")

    def _sync(self) -> None:
        if self.cuda:
            self.stream.stream.synchronize()

    def _account(self, seconds: float, nbytes: int) -> None:
        self.stats.restores += 1
        self.stats.restore_s += seconds
        if seconds > 0:
            rate = nbytes / seconds
            old = self.stats.link_bytes_per_s
            self.stats.link_bytes_per_s = rate if old == 0 else 0.9 * old + 0.1 * rate

    def _collect_timings(self) -> None:
        """Fold in the device times of loads that have finished (never waits)."""
        while self._timed and self._timed[0][1].query():
            start_ev, end_ev, nbytes = self._timed.pop(0)
            self._account(start_ev.elapsed_time(end_ev) / 1e3, nbytes)
