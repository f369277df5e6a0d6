"""The runner's side of KV offload: runs a step's copies between the GPU KV pool and the CPU tier.

On a GPU the copies go on a side stream: it first waits for the work already queued on the compute stream
(the blocks stored may be written by the step still in flight), runs the ops in order (a block may be stored
and then reloaded with another block in one step), and records an event; the compute stream waits on that
event only, so this step's forward waits for this step's copies and nothing else, and the host waits on a
slot's event before it reads or writes the slot. On a CPU the same copies run synchronously.

A store gathers the blocks of every layer into one contiguous [n, layers, 2, block_size, heads, head_dim]
staging tensor, then copies runs of consecutive slots in one piece each; a load does the reverse. In debug
mode every copy is checked against a crc32: the GPU block's at store time must come back at load time.
"""

from __future__ import annotations

import time
import zlib

import torch

from meshserve.engine.kv_offload.cpu_tier import CPUTier
from meshserve.engine.kv_offload.manager import KVOffloadStats, Transfer

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
    """Executes Transfer ops between one rank's KV pool tensors and its CPUTier."""

    def __init__(self, kv_tensors: list[torch.Tensor], cpu: CPUTier, stats: KVOffloadStats, verify: bool = False):
        self.kv_tensors = kv_tensors  # per layer [2, num_blocks, block_size, heads, head_dim]
        self.cpu = cpu
        self.stats = stats
        self.verify = verify
        self.device = kv_tensors[0].device
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._timed: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []  # loads still being timed

    def run(self, ops: list[Transfer]) -> None:
        """Queue ops in order; the current stream's next work waits for them."""
        if not ops:
            return
        if not self.cuda:
            self._run_groups(ops)
            return
        self._collect_timings()
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            self._run_groups(ops)
            done = torch.cuda.Event()
            done.record(self.stream)
        compute.wait_event(done)
        for kind, a, b in ops:
            self.cpu.events[b if kind == "store" else a] = done

    def _run_groups(self, ops: list[Transfer]) -> None:
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
                self._store([a for _, a, _ in group], [b for _, _, b in group])
            else:
                self._load([a for _, a, _ in group], [b for _, _, b in group])
            i = j

    def _gather(self, block_ids: list[int]) -> torch.Tensor:
        """The blocks of every layer as one contiguous [n, layers, 2, block_size, heads, head_dim] tensor."""
        idx = torch.tensor(block_ids, device=self.device)
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
        start_ev = None
        if self.cuda:
            start_ev = torch.cuda.Event(enable_timing=True)
            start_ev.record(self.stream)
        staging = torch.empty((len(slots), *self.cpu.tensor.shape[1:]), dtype=self.cpu.tensor.dtype,
                              device=self.device)
        for start, slot, n in _runs(slots):
            staging[start : start + n].copy_(self.cpu.tensor[slot : slot + n], non_blocking=True)
        idx = torch.tensor(block_ids, device=self.device)
        for layer, t in enumerate(self.kv_tensors):
            src = staging[:, layer].transpose(0, 1)
            if t.dtype == torch.float8_e4m3fn:  # an fp8 cache: CPU torch has no fp8 index_copy_, move the bytes
                t, src = t.view(torch.uint8), src.view(torch.uint8)
            t.index_copy_(1, idx, src)
        nbytes = len(slots) * self.cpu.block_bytes
        if self.cuda:
            end_ev = torch.cuda.Event(enable_timing=True)
            end_ev.record(self.stream)
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
            self.stream.synchronize()

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
