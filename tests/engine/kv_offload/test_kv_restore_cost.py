"""Restores from disk only when reading beats recomputing: the read-rate estimate, the decision, the probe."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from meshserve.config import SchedulerConfig
from meshserve.engine.block_manager import BlockManager
from meshserve.engine.kv_offload.cpu_tier import CPUTier
from meshserve.engine.kv_offload.disk_tier import DiskTier
from meshserve.engine.kv_offload.manager import KVOffloadManager
from meshserve.engine.kv_offload.read_rate import ReadRate
from meshserve.engine.scheduling_policy import SchedulingPolicy
from meshserve.engine.sequence import Sequence
from meshserve.engine.step_time import StepShape
from meshserve.sampling import SamplingParams

BS = 4
PER_TOKEN_S = 1e-3  # the fake step-time model: a prefilled token costs 1 ms


def make_seq(seq_id: str, prompt) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=seq_id, index=0, prompt_token_ids=list(prompt),
                    params=SamplingParams(max_tokens=4), max_tokens=4)


def on_disk(tmp_path, prompt, rate: float, slots: int = 16) -> tuple[BlockManager, KVOffloadManager, Sequence]:
    """An engine restarted over a disk tier holding prompt's full blocks (nothing on the GPU or in the CPU tier),
    whose reads are predicted at rate bytes/s, and a prefill predicted at PER_TOKEN_S a token."""
    cpu = CPUTier(slots, (1, 2, BS, 1, 1), torch.float32, False)
    disk = DiskTier(str(tmp_path), bytes(16), 1 << 20, cpu.block_bytes, read_rate=ReadRate(rate))
    bm = BlockManager(16, BS)
    manager = KVOffloadManager(cpu, disk)
    bm.attach_offload(manager)
    bm.prefill_range_s = lambda start, end: (end - start) * PER_TOKEN_S
    seq = make_seq("s", prompt)
    bm._update_hashes(seq)
    for i, h in enumerate(seq.block_hashes):
        disk.put(h, bytes([i]) * cpu.block_bytes)
    disk.flush()
    disk.read_rate.num_measured = 1  # as if measured at rate: no first measurement reads behind the test's back
    return bm, manager, seq


def settle(manager: KVOffloadManager) -> None:
    """Every disk read started has finished and been filed."""
    for _, future, _ in list(manager.reading.values()):
        future.result()
    manager.poll()


def test_read_rate_starts_from_its_seed_then_follows_measurements():
    rate = ReadRate(seed_bytes_per_s=1e9, decay=0.5)
    assert rate.predict_s(2e9) == 2.0 and rate.num_measured == 0
    rate.update(8_000, 2.0)  # the first measurement replaces the seed
    assert rate.bytes_per_s == 4_000
    rate.update(8_000, 1.0)  # (4,000 + 8,000) / (1 + 1)
    assert rate.bytes_per_s == 6_000 and rate.num_measured == 2
    rate.update(1_000_000, 10.0)  # a large batch outweighs the small ones before it
    assert rate.bytes_per_s == pytest.approx(1_006_000 / 11)
    rate.update(0, 1.0)  # nothing read: nothing learnt
    assert rate.num_measured == 3
    with pytest.raises(ValueError):
        ReadRate(0)


def test_a_read_batch_measures_its_bytes_over_its_span(tmp_path):
    ticks = itertools.count()
    lock = threading.Lock()

    def clock():  # each call one second later: a part that reads k blocks takes 1 s whatever k
        with lock:
            return float(next(ticks))

    disk = DiskTier(str(tmp_path), bytes(16), 1 << 20, 64, clock=clock)
    for i in range(6):
        disk.put(bytes([i]) * 16, bytes([i]) * 64)
    disk.flush()
    disk.num_readers = 1  # one part: clock() at its start and its end
    outs = [bytearray(64) for _ in range(6)]
    import numpy as np

    batches = disk.read_batches([(bytes([i]) * 16, np.frombuffer(outs[i], dtype=np.uint8)) for i in range(6)])
    assert [f.result() is not None for _, f in batches] == [True]
    assert disk.read_rate.num_measured == 1 and disk.read_rate.bytes_per_s == 6 * disk.file_bytes / 1.0
    assert outs[5] == bytes([5]) * 64
    disk.close()


def test_a_slow_disk_is_skipped_and_recomputed_with_a_probe_read_nobody_waits_for(tmp_path):
    prompt = range(21)  # 5 full blocks on disk; the lookup covers 5 (one token is always left to compute)
    bm, manager, seq = on_disk(tmp_path, prompt, rate=1.0)  # 1 byte/s: reading never pays
    gate, read_into = threading.Event(), manager.disk.read_into
    manager.disk.read_into = lambda *args: (gate.wait(10), read_into(*args))[1]  # the probe ends when we say
    assert bm.find_cached_prefix(seq) == []  # a miss, not a wait
    stats = manager.stats
    assert (stats.disk_restores_skipped, stats.disk_blocks_skipped, stats.disk_hits) == (1, 5, 0)
    probed = set(manager.probing)
    assert probed and probed <= set(seq.block_hashes[: manager.disk.num_readers])
    assert bm.find_cached_prefix(seq) == []  # the probe under way is not waited for; one probe at a time
    assert manager.probing == probed and stats.disk_restores_skipped == 2
    gate.set()
    settle(manager)
    assert not manager.probing and all(h in manager.cpu for h in probed)
    assert manager.disk.read_rate.num_measured == 2  # the probe measured the disk (fast: a page-cached file)


def test_a_fast_disk_is_read_and_the_request_waits_for_it(tmp_path):
    bm, manager, seq = on_disk(tmp_path, range(21), rate=1e15)
    assert bm.find_cached_prefix(seq) is None  # being read: the request waits
    settle(manager)
    hits = bm.find_cached_prefix(seq)
    assert [b.block_hash for b in hits] == seq.block_hashes[:5]
    assert manager.stats.disk_hits == 5 and manager.stats.disk_restores_skipped == 0


def test_the_decision_asks_for_the_prefill_of_the_whole_run(tmp_path):
    bm, manager, seq = on_disk(tmp_path, range(21), rate=1.0)
    asked = []
    bm.prefill_range_s = lambda start, end: asked.append((start, end)) or 0.0
    bm.find_cached_prefix(seq)
    assert asked == [(0, 20)]  # the whole disk run's tokens, from the first


@pytest.mark.parametrize("read_ms, waits", [(19.9, True), (20.1, False)])
def test_the_run_is_read_when_reading_beats_its_prefill(tmp_path, read_ms, waits):
    bm, manager, seq = on_disk(tmp_path, range(21), rate=1.0)  # 5 blocks: 20 ms of prefill
    manager.disk.read_rate = ReadRate(5 * manager.disk.file_bytes / (read_ms / 1e3))
    assert (bm.find_cached_prefix(seq) is None) == waits


def test_without_a_step_time_model_disk_runs_are_always_read(tmp_path):
    bm, manager, seq = on_disk(tmp_path, range(21), rate=1.0)
    bm.prefill_range_s = lambda start, end: None
    assert bm.find_cached_prefix(seq) is None and manager.stats.disk_restores_skipped == 0


def test_a_read_batch_landing_out_of_order_is_not_read_twice(tmp_path):
    bm, manager, seq = on_disk(tmp_path, range(21), rate=1e15)
    disk = manager.disk
    gate, read_into = threading.Event(), disk.read_into
    reads = []

    def gated(block_hash, out):  # the run's first block answers when the test says; the others at once
        reads.append(block_hash)
        if block_hash == seq.block_hashes[0]:
            gate.wait(10)
        return read_into(block_hash, out)

    disk.read_into = gated
    disk.num_readers = 2
    assert bm.find_cached_prefix(seq) is None
    parts = {id(f): f for _, f, _ in manager.reading.values()}
    assert len(parts) == 2  # two reader threads: [0, 1] and [2, 3, 4]
    first = manager.reading[seq.block_hashes[0]][1]
    for f in parts.values():
        if f is not first:
            f.result()
    manager.poll()  # the later part landed; the first block is still being read
    assert all(h in manager.cpu for h in seq.block_hashes[2:5])
    assert bm.find_cached_prefix(seq) is None  # waits for the first part; reads nothing again
    gate.set()
    settle(manager)
    assert len(bm.find_cached_prefix(seq)) == 5
    assert sorted(reads) == sorted(seq.block_hashes[:5])  # each block read once
    cpu = manager.cpu
    assert len(cpu.lru) + len(cpu.free) == cpu.num_slots  # no slot lost to a second copy of a block


class LinearStepModel:
    def predict(self, shape: StepShape) -> float:  # tokens, plus the attention over the context
        return shape.num_tokens * 1e-3 + shape.context_tokens * 1e-6


def test_prefill_range_sums_chunks_whose_attention_reads_the_prefix():
    policy = SchedulingPolicy(SchedulerConfig(max_num_batched_tokens=100), LinearStepModel())
    # tokens 50..249 in chunks 50-149, 150-249 reading contexts of 150 and 250 tokens
    assert policy.prefill_range_s(50, 250) == pytest.approx(200e-3 + 400e-6)
    assert policy.prefill_range_s(50, 50) == 0.0
    assert SchedulingPolicy(SchedulerConfig()).prefill_range_s(0, 10) is None


def test_the_read_rate_is_measured_once_the_disk_holds_blocks(tmp_path):
    bm, manager, seq = on_disk(tmp_path, range(21), rate=1.0)  # as at a warm restart: 5 blocks written
    disk = manager.disk
    disk.read_rate = ReadRate(1.0)  # the seed only
    gate, read_into = threading.Event(), disk.read_into
    disk.read_into = lambda *args: (gate.wait(10), read_into(*args))[1]
    manager.poll()
    futures = list(manager._measuring)
    assert futures and disk.read_rate.num_measured == 0
    manager.poll()
    assert manager._measuring == futures  # one measurement
    gate.set()
    for f in futures:
        assert all(crc is not None for crc in f.result())
    assert disk.read_rate.num_measured == 1 and disk.read_rate.bytes_per_s > 1.0
    stats = manager.snapshot()
    assert stats.disk_reads == 1 and stats.disk_read_s > 0 and stats.disk_read_bytes_per_s > 1.0
    assert not manager.cpu.lru and len(manager.cpu.free) == manager.cpu.num_slots  # scratch reads: no slot taken
