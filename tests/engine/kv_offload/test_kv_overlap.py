"""KV offload copies overlapped with compute: stores on the copy stream and blocks in flight until their event
fires (never written meanwhile), loads waited on by the forward only, failed stores recovered, disk reads off the
engine thread; greedy tokens unchanged under KV pressure."""

from __future__ import annotations

import threading

import pytest
import torch

from meshserve import LLM, SamplingParams
from meshserve.engine.block_manager import BlockManager
from meshserve.engine.kv_offload.copy_stream import CopyEvent, SyncCopyStream
from meshserve.engine.kv_offload.cpu_tier import CPUTier
from meshserve.engine.kv_offload.disk_tier import DiskTier
from meshserve.engine.kv_offload.manager import KVOffloadManager, KVOffloadStats
from meshserve.engine.kv_offload.transfer import KVTransferEngine
from tests.engine.kv_offload.test_kv_offload_engine import MAX_NEW, gib, hf_greedy, prompts
from tests.engine.kv_offload.test_kv_offload_manager import BS, make_seq, run_prompt


class SlowEvent:
    """Fires once its stream's clock (steps, advanced by the test) reaches `due`: a store still copying when
    the scheduler first looks."""

    def __init__(self, stream: RecordingStream, due: int):
        self.clock, self.due = stream, due
        self.stream = "copy"

    def query(self) -> bool:
        return self.clock.now >= self.due

    def synchronize(self) -> None:
        self.clock.now = max(self.clock.now, self.due)


class RecordingStream(SyncCopyStream):
    """The synchronous path (copies done at once), with its events slow and its calls written down."""

    def __init__(self, steps: int = 0):
        self.steps = steps
        self.now = 0
        self.calls: list = []

    def record(self, timing: bool = False):
        event = SlowEvent(self, self.now + self.steps)
        self.calls.append(("record", event))
        return event

    def compute_waits(self, event) -> None:
        self.calls.append(("compute_waits", event))


def kv_pool(blocks: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, blocks, BS, 1, 1, generator=g) for _ in range(1)]


def test_forward_waits_for_loads_only_and_stores_after_them_overlap():
    kv = kv_pool()
    cpu = CPUTier(4, (1, 2, BS, 1, 1), torch.float32, False)
    stream = RecordingStream()
    eng = KVTransferEngine(kv, cpu, KVOffloadStats(), stream=stream)
    eng.run([("store", 1, 0), ("load", 0, 2), ("store", 3, 1), ("store", 4, 2)])
    (_, ready), (_, done) = [c for c in stream.calls if c[0] == "record"]
    assert ("compute_waits", ready) in stream.calls and ("compute_waits", done) not in stream.calls
    # the store before the load is in the forward's wait; the two after it are not
    assert cpu.store_events[1] is ready and cpu.store_events[3] is done and cpu.store_events[4] is done
    assert torch.equal(kv[0][:, 2], kv[0][:, 1])  # block 1 went to slot 0 and came back into block 2
    stream.calls.clear()
    eng.run([("store", 5, 3)])  # stores only: the forward does not wait at all
    assert not [c for c in stream.calls if c[0] == "compute_waits"]


def test_a_block_in_flight_is_not_reallocated_until_its_store_fires():
    bm = BlockManager(8, BS)
    cpu = CPUTier(8, (1, 2, BS, 1, 1), torch.float32, False)
    manager = KVOffloadManager(cpu, None)
    bm.attach_offload(manager)
    stream = RecordingStream(steps=2)
    eng = KVTransferEngine(kv_pool(), cpu, manager.stats, stream=stream)
    a = make_seq("a", range(13))
    run_prompt(bm, a)
    a_ids = list(bm.block_table(a))[:3]
    bm.free(a)
    b = make_seq("b", range(100, 132))  # needs all 8 blocks: a's 3 cached ones must be stored first
    waits = 0
    while not bm.allocate(b, 32):
        assert bm.pool.in_flight == set(a_ids) and bm.num_landing_blocks == 3
        waits += 1
        assert waits < 10, "the store never landed"
        eng.run(bm.take_transfers())  # the step: its stores run, their events fire 2 steps later
        stream.now += 1
        bm.poll_offload()
    assert waits == 2  # the stores started, ran, were still copying at the next poll, then fired
    assert set(a_ids) <= set(bm.block_table(b)) and not bm.pool.in_flight
    assert all(h in cpu for h in a.block_hashes[:3])


def test_a_failed_store_frees_its_block_and_slot():
    bm = BlockManager(8, BS)
    cpu = CPUTier(8, (1, 2, BS, 1, 1), torch.float32, False)
    manager = KVOffloadManager(cpu, None, "swap")
    bm.attach_offload(manager)
    eng = KVTransferEngine(kv_pool(), cpu, manager.stats)
    eng._store = lambda *a: (_ for _ in ()).throw(RuntimeError("copy engine fault"))  # every store raises
    s = make_seq("s", range(10))
    run_prompt(bm, s)
    assert bm.swap_out(s, lambda: 1.0)
    eng.run(bm.take_transfers())
    assert bm.poll_offload() == ["s"]  # its KV is lost: the scheduler makes it recompute
    assert not bm.pool.in_flight and bm.num_free_blocks == 8 and "s" not in manager.swapped
    assert len(cpu.free) == 8 and manager.stats.store_failures == 3


def test_disk_reads_run_off_the_engine_thread(tmp_path):
    cpu = CPUTier(4, (1, 2, BS, 1, 1), torch.float32, False)
    disk = DiskTier(str(tmp_path), b"f" * 16, 1 << 20, cpu.block_bytes)
    manager = KVOffloadManager(cpu, disk)
    payload = bytes((i * 7) % 256 for i in range(cpu.block_bytes))
    disk.put(b"h" * 16, payload)
    disk.flush()
    gate, readers = threading.Event(), []
    plain = disk.read_into

    def blocking_read(block_hash, out):  # a disk that answers only when the test says
        readers.append(threading.get_ident())
        assert gate.wait(10)
        return plain(block_hash, out)

    disk.read_into = blocking_read
    assert manager.find([b"h" * 16]) == ([], True)  # returns at once: the read is waiting on its thread
    manager.poll()
    assert manager.find([b"h" * 16]) == ([], True) and b"h" * 16 not in cpu
    gate.set()
    for _ in range(1000):
        manager.poll()
        if b"h" * 16 in cpu:
            break
        threading.Event().wait(0.005)
    found, reading = manager.find([b"h" * 16])
    assert not reading and [(h, tier) for h, _, tier in found] == [(b"h" * 16, "disk")]
    assert readers and threading.get_ident() not in readers
    assert cpu.slot_bytes(found[0][1]).tobytes() == payload
    assert found[0][1] in cpu.checksums  # the file's crc, checked again on the way to the GPU (verify mode)
    disk.close()


def _greedy(model: str, ps: list[list[int]], **kwargs) -> tuple[list[list[int]], dict, int]:
    llm = LLM(model=model, block_size=4, num_gpu_blocks_override=12, **kwargs)
    runner = llm.engine.core.executor.runner
    kv_transfer = getattr(runner, "kv_transfer", None)
    written_in_flight = 0
    if kv_transfer is not None:
        stream = kv_transfer.stream = RecordingStream(steps=2)  # stores still copying at the next step's poll
        launch = runner.launch

        def checked_launch(out):  # the blocks this step writes are never ones with a store in flight
            nonlocal written_in_flight
            launch_stores = {a for kind, a, _ in out.kv_transfers if kind == "store"}
            for e in out.scheduled:
                first, last = e.num_computed_tokens // 4, (e.num_computed_tokens + len(e.token_ids) - 1) // 4
                written = set(e.block_table[first : last + 1])
                written_in_flight += len(written & (launch_stores | set(kv_transfer.cpu.store_events)))
            return launch(out)

        bm = llm.engine.core.scheduler.block_manager
        poll = bm.poll_offload

        def ticking_poll():  # a step's time passes between polls (the copies progress on their own)
            stream.now += 1
            return poll()

        runner.launch, bm.poll_offload = checked_launch, ticking_poll
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    stats = llm.engine.stats()
    llm.shutdown()
    return [o.outputs[0].token_ids for o in outs], stats, written_in_flight


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_tokens_unchanged_with_slow_stores_and_swaps(family, tiny_model_dir, hf_model):
    model = tiny_model_dir(family)
    ps = prompts(3, n=6, length=12)
    expected = [hf_greedy(hf_model(model), p) for p in ps]
    got, stats, written_in_flight = _greedy(
        model, ps, kv_offloading_size=gib(64), preemption_mode="swap", kv_offloading_verify=True
    )
    assert got == expected
    assert stats["kv_offload_swaps_out"] > 0 and stats["kv_offload_swaps_in"] == stats["kv_offload_swaps_out"]
    assert written_in_flight == 0 and stats["kv_offload_store_failures"] == 0


def test_failing_stores_recompute_and_never_hang(tiny_model_dir, hf_model, monkeypatch):
    model = tiny_model_dir("llama")
    ps = prompts(4, n=6, length=12)
    expected = [hf_greedy(hf_model(model), p) for p in ps]

    def broken_store(self, block_ids, slots):
        raise RuntimeError("copy engine fault")

    monkeypatch.setattr(KVTransferEngine, "_store", broken_store)
    got, stats, _ = _greedy(model, ps, kv_offloading_size=gib(64), preemption_mode="swap")
    assert got == expected
    assert stats["kv_offload_store_failures"] > 0 and stats["num_preemptions"] > 0


def test_copy_event_of_the_plain_path_has_passed():
    event = SyncCopyStream().record()
    assert isinstance(event, CopyEvent) and event.query() and event.stream is None


@pytest.mark.gpu
def test_gpu_copies_on_a_side_stream_with_tokens_unchanged(tiny_model_dir):
    model = tiny_model_dir("llama")
    ps = prompts(5, n=6, length=12)
    base = LLM(model=model, block_size=4, num_gpu_blocks_override=12, device="cuda")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    expected = [
        o.outputs[0].token_ids
        for o in base.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    ]
    base.shutdown()
    llm = LLM(
        model=model,
        block_size=4,
        num_gpu_blocks_override=12,
        device="cuda",
        kv_offloading_size=gib(64),
        preemption_mode="swap",
        kv_offloading_verify=True,
    )
    copy = llm.engine.core.executor.runner.kv_transfer.stream
    events, record = [], copy.record
    copy.record = lambda timing=False: events.append(record(timing)) or events[-1]
    got = [
        o.outputs[0].token_ids
        for o in llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    ]
    stats = llm.engine.stats()
    llm.shutdown()
    assert got == expected and stats["kv_offload_swaps_out"] > 0
    assert events and all(e.stream == copy.stream for e in events)
    assert copy.stream != torch.cuda.default_stream() and copy.stream != torch.cuda.current_stream()


def test_write_through_stores_run_after_the_forward_that_fills_them(tiny_model_dir):
    llm = LLM(model=tiny_model_dir("llama"), block_size=4, num_gpu_blocks_override=24, kv_offloading_size=gib(64))
    runner = llm.engine.core.executor.runner
    order, forward, run = [], runner._run_forward, runner.kv_transfer.run

    def recorded_forward(*args, **kwargs):
        order.append(("forward", None))
        return forward(*args, **kwargs)

    def recorded_run(ops):
        order.extend(("store", a) for kind, a, _ in ops if kind == "store")
        return run(ops)

    runner._run_forward, runner.kv_transfer.run = recorded_forward, recorded_run
    p = prompts(6, n=1, length=13)[0]  # 3 full blocks and a partial one
    llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    stats = llm.engine.stats()
    llm.shutdown()
    # the prefill's forward fills 3 blocks; each is copied down after it, in the same step
    assert order[:4] == [("forward", None)] + [("store", b) for b in (o[1] for o in order[1:4])]
    assert len({b for k, b in order if k == "store"}) == 3 and stats["kv_offload_cpu_bytes_stored"] > 0
