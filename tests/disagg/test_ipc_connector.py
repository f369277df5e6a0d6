"""The ipc connector on its own (no engines): a producer process exports its pool, the consumer maps it and
reads blocks by id (whole-request and layer by layer) byte for byte into its own, touching nothing else; the
producer frees its blocks on the acknowledgement; a CPU pool is moved into shared memory in place; a peer on
another host is a one-line start-up error; a producer that is gone fails the read cleanly. The same test runs
on CPU (shared memory) and, marked gpu, on one CUDA device or two (CUDA IPC)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import subprocess
import sys
import threading
import time

import pytest
import torch

from meshserve.disagg import ipc_connector as ic
from meshserve.disagg.config import parse_kv_transfer_config
from meshserve.disagg.connector import HeldTransfer, PullJob
from meshserve.disagg.layerwise import LayerJob
from meshserve.errors import KVTransferError
from tests.disagg.engine_pair import free_port, join, started_pair, transfer_config

LAYERS, BLOCKS, SHAPE = 3, 10, (4, 2, 8)  # block_size, kv heads, head dim
BLOCK_BYTES = 2 * SHAPE[0] * SHAPE[1] * SHAPE[2] * 4  # one block of one layer, K and V, float32


def _pool(seed: int, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, BLOCKS, *SHAPE, generator=g).to(device) for _ in range(LAYERS)]


def _connector(role: str, rank: int, port: int, device: str = "cpu", **extra) -> ic.IpcConnector:
    extra = {"transfer_timeout_s": 5, "hold_timeout_s": 60, **extra}
    cfg = transfer_config(role, rank, port, connector="ipc", **extra)
    return ic.IpcConnector(parse_kv_transfer_config(cfg), _pool(rank, device))


def copy_blocks(dst, dst_ids, src, src_ids):
    ic.BlockCopy(dst_ids, src_ids, dst.device, src.device)(dst, src)


def test_copy_blocks_slices_and_gathers_alike():
    src, dst = _pool(0)[0], torch.zeros(2, BLOCKS, *SHAPE)
    ids = [(list(range(9)), list(range(1, 10))), ([9, 0, 4, 7, 1, 2, 3, 5, 6], [0, 9, 8, 7, 6, 5, 4, 3, 2])]
    for src_ids, dst_ids in ids:  # one run (slices), then nine (a gather and a scatter)
        copy_blocks(dst, dst_ids, src, src_ids)
        assert torch.equal(dst[:, dst_ids], src[:, src_ids])
    assert ic._runs([3, 4, 5, 9], [0, 1, 7, 8]) == [(3, 0, 2), (5, 7, 1), (9, 8, 1)]
    assert ic._runs([3, 4, 5, 9], [0, 1, 7, 8], limit=3) == [(3, 0, 2), (5, 7, 1), (9, 8, 1)]
    assert ic._runs([3, 4, 5, 9], [0, 1, 7, 8], limit=2) is None  # (a third run: more than the limit)
    fp8 = torch.randn(2, BLOCKS, *SHAPE).to(torch.float8_e4m3fn)
    out = torch.zeros_like(fp8)
    copy_blocks(out, [1, 5, 2, 8, 0, 3, 4, 6, 7], fp8, list(range(9)))  # (the gather path, as bytes)
    assert torch.equal(out[:, [1, 5, 2]].view(torch.uint8), fp8[:, :3].view(torch.uint8))


def test_id_stage_reuses_its_buffers_and_grows():
    stage = ic.IdStage(torch.device("cpu"))
    src, dst = stage.upload([5, 1, 9], [2, 3, 0])
    assert src.tolist() == [5, 1, 9] and dst.tolist() == [2, 3, 0]
    buffer = stage.dev.data_ptr()
    src, dst = stage.upload([4], [7])  # (the next read overwrites the same buffer)
    assert (src.tolist(), dst.tolist(), stage.dev.data_ptr()) == ([4], [7], buffer)
    many = list(range(1500))
    src, dst = stage.upload(many, many[::-1])  # past the first 1,024: a larger buffer
    assert src.tolist() == many and dst.tolist() == many[::-1] and stage.dev.numel() >= 3000
    pool, out = _pool(0)[0], torch.zeros(2, BLOCKS, *SHAPE)
    ids = [9, 0, 4, 7, 1, 2, 3, 5, 6], [0, 9, 8, 7, 6, 5, 4, 3, 2]
    ic.BlockCopy(ids[1], ids[0], out.device, pool.device, stage)(out, pool)  # (a gather through the stage)
    assert torch.equal(out[:, ids[1]], pool[:, ids[0]])


def test_process_watch_sees_an_exit_a_zombie_included():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    watch = ic.ProcessWatch(proc.pid)
    assert watch.alive() and ic._alive(proc.pid)
    proc.stdin.close()  # it exits; unreaped, it stays a zombie
    deadline = time.monotonic() + 10
    while watch.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not watch.alive() and not ic._alive(proc.pid) and proc.poll() is not None
    watch.close()
    assert not ic.ProcessWatch(proc.pid).alive()  # reaped: no such process


def test_a_cpu_pool_is_shared_in_place():
    pool = _pool(3)
    before = [t.clone() for t in pool]
    ids = [id(t) for t in pool]
    ic.share_pool(pool)
    assert [id(t) for t in pool] == ids  # the same tensors: a layer bound to one keeps it
    assert all(t.is_shared() for t in pool) and all(torch.equal(a, b) for a, b in zip(pool, before))
    mapped = ic.map_pool(ic.export_pool(pool))
    mapped[0][1, 2].fill_(7.0)  # the mapping is the pool's memory, not a copy
    assert (pool[0][1, 2] == 7.0).all()


def _producer_process(port: int, device: str, ready, hold, held=(("t", [5, 1, 8]), ("c", [2, 3, 4]))) -> None:
    """A producer connector alone in its own process (kv rank 1), holding `held` (by default transfer "t", blocks
    5, 1, 8, and "c", blocks 2, 3, 4: contiguous; first tokens 42, 43, ...), then what `hold` brings, until
    killed."""
    prod = _connector("kv_producer", 1, port, device)
    prod.start()
    for i, (tid, ids) in enumerate(held):
        prod.hold(HeldTransfer(tid, ids, 12, 42 + i, time.monotonic() + 60))
    ready.put(("ready", [ev.kind for ev in _drain(prod)]))
    while True:
        msg = hold.get()
        if msg == "released?":  # the acknowledgements freed what was read (the server thread pops each
            freed, deadline = [], time.monotonic() + 30  # held transfer before its "released" event)
            while len(freed) < 2 and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    freed.append(prod.events.get(timeout=0.5).transfer_id)
            ready.put(("released", sorted(freed), sorted(prod._held)))


def _drain(conn):
    out = []
    while not conn.events.empty():
        out.append(conn.events.get())
    return out


def _consumer_with_producer(device: str, producer_device: str, *held):
    ctx = mp.get_context("spawn")
    port = free_port()
    ready, hold = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_producer_process, args=(port, producer_device, ready, hold, *held), daemon=True)
    proc.start()
    # the consumer is kv rank 0, the rendezvous store's host: the store outlives the producer
    cons = _connector("kv_consumer", 0, port, device)
    return proc, cons, ready, hold


@pytest.mark.parametrize(
    "devices",
    [
        ("cpu", "cpu"),
        pytest.param(("cuda:0", "cuda:0"), marks=pytest.mark.gpu, id="one-gpu"),
        pytest.param(("cuda:0", "cuda:1"), marks=pytest.mark.gpu, id="two-gpus"),
    ],
)
def test_reads_from_a_producer_process_are_byte_identical_and_acked(devices):
    device, producer_device = devices
    if device != "cpu" and torch.cuda.device_count() < (2 if producer_device == "cuda:1" else 1):
        pytest.skip(f"needs {producer_device}")
    proc, cons, ready, hold = _consumer_with_producer(device, producer_device)
    try:
        cons.start()  # maps the producer's pool (eagerly: it started first or waits in the store)
        assert ready.get(timeout=120)[0] == "ready"
        [(watch, mapped)] = cons._peers.values()
        assert watch.pid == proc.pid and watch.alive() and mapped[0].device == torch.device(producer_device)
        want = _pool(1)  # the producer's pool, drawn from its seed here
        before = [t.cpu().clone() for t in cons.kv_tensors]
        for tid, remote, local in (("t", [5, 1, 8], [0, 9, 3]), ("c", [2, 3, 4], [6, 7, 8])):
            cons.pull(PullJob(tid, tid, local, 12))
            ev = cons.events.get(timeout=30)
            assert (ev.kind, ev.num_bytes) == ("received", LAYERS * 3 * BLOCK_BYTES), ev
            for w, c in zip(want, cons.kv_tensors):
                assert torch.equal(c[:, local].cpu(), w[:, remote])
        others = [i for i in range(BLOCKS) if i not in (0, 9, 3, 6, 7, 8)]
        for c, b in zip(cons.kv_tensors, before):
            assert torch.equal(c[:, others].cpu(), b[:, others])  # nothing else written
        hold.put("released?")
        assert ready.get(timeout=30) == ("released", ["c", "t"], [])  # both freed by the Acks, none held
    finally:
        proc.kill()
        join(proc, 10)
        cons.close()


def test_a_handle_naming_the_producers_blocks_reads_beside_the_grant():
    """Ids ahead (PullJob.remote_block_ids, as the prefill's answer names them): the read starts before the grant
    comes back and is kept once it does; a handle with other ids than the producer's is read again with the
    granted ones; a refused grant fails the pull."""
    proc, cons, ready, hold = _consumer_with_producer("cpu", "cpu", (("a", [7, 0, 6]), ("b", [3, 8, 5])))
    try:
        cons.start()
        assert ready.get(timeout=120)[0] == "ready"
        want = _pool(1)
        reads = []
        orig = cons._read_blocks
        cons._read_blocks = lambda src, remote, local, t: reads.append(list(remote)) or orig(src, remote, local, t)
        for tid, handle, remote, local, token in (("a", [7, 0, 6], [7, 0, 6], [1, 2, 4], 42),
                                                  ("b", [1, 2, 9], [3, 8, 5], [0, 9, 3], 43)):
            cons.pull(PullJob(tid, tid, local, 12, remote_rank=1, remote_block_ids=handle))
            ev = cons.events.get(timeout=30)
            assert (ev.kind, ev.first_token, ev.num_bytes) == ("received", token, LAYERS * 3 * BLOCK_BYTES), ev
            for w, c in zip(want, cons.kv_tensors):
                assert torch.equal(c[:, local], w[:, remote])
        assert reads == [[7, 0, 6], [1, 2, 9], [3, 8, 5]]  # (b: the handle's, then the granted blocks)
        cons.pull(PullJob("x", "x", [5, 6, 7], 12, remote_rank=1, remote_block_ids=[7, 0, 6]))
        ev = cons.events.get(timeout=30)
        assert ev.kind == "failed" and "unknown transfer" in ev.reason, ev
        hold.put("released?")
        assert ready.get(timeout=30) == ("released", ["a", "b"], [])  # both acknowledged, none held
    finally:
        proc.kill()
        join(proc, 10)
        cons.close()


def test_a_graph_capture_the_platform_refuses_falls_back_to_launched_reads():
    """(CPU stands in for the GPU here: the graphs are GPU-only, the fallback is the connector's.)"""
    proc, cons, ready, _ = _consumer_with_producer("cpu", "cpu")
    try:
        cons.start()
        assert ready.get(timeout=120)[0] == "ready"
        tried = []

        def refusing_graphs(src, remote):
            if not cons._graph_reads:
                return None

            def replay(dst_ids, src_ids):
                tried.append(len(dst_ids))
                raise RuntimeError("operation not permitted when stream is capturing")

            return replay

        cons._graph_reads, cons._graphs = True, refusing_graphs
        for tid, remote, local in (("t", [5, 1, 8], [0, 9, 3]), ("c", [2, 3, 4], [6, 7, 8])):
            cons.pull(PullJob(tid, tid, local, 12))
            ev = cons.events.get(timeout=30)
            assert ev.kind == "received", ev
            for w, c in zip(_pool(1), cons.kv_tensors):
                assert torch.equal(c[:, local], w[:, remote])
        assert tried == [3] and not cons._graph_reads  # tried once, then launched reads only
    finally:
        proc.kill()
        join(proc, 10)
        cons.close()


def test_a_producer_gone_after_the_grant_fails_the_read_cleanly():
    proc, cons, ready, _ = _consumer_with_producer("cpu", "cpu")
    try:
        cons.start()
        assert ready.get(timeout=120)[0] == "ready"
        orig = cons._read_blocks

        def read_after_the_producer_died(src, remote_ids, block_ids, timeout_s):
            proc.kill()  # granted, then gone before the consumer reads: its memory may be reused by a restart
            join(proc, 10)
            return orig(src, remote_ids, block_ids, timeout_s)

        cons._read_blocks = read_after_the_producer_died
        t0 = time.monotonic()
        cons.pull(PullJob("r", "t", [0, 9, 3], 12))
        ev = cons.events.get(timeout=30)
        assert ev.kind == "failed" and f"pid {proc.pid}) is gone" in ev.reason, ev
        assert time.monotonic() - t0 < 10 and not cons._peers  # the mapping dropped
    finally:
        proc.kill()
        join(proc, 10)
        cons.close()


def test_a_peer_on_another_host_is_a_one_line_start_error(monkeypatch):
    port = free_port()
    prod = _connector("kv_producer", 0, port)  # (exports at construction: with this host's id)
    monkeypatch.setattr(ic, "host_id", lambda: "elsewhere/0")  # the consumer's host
    cons = _connector("kv_consumer", 1, port)
    errors = []

    def start(conn):
        try:
            conn.start()
        except KVTransferError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=start, args=(c,)) for c in (prod, cons)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert len(errors) == 1 and "\n" not in errors[0], errors
        assert "must share a host" in errors[0] and "this one on elsewhere/0" in errors[0]
    finally:
        prod.close()
        cons._ctx.term()  # (its start failed before the side channel opened)


def test_layer_by_layer_reads_follow_the_announcements():
    """Layer-wise: each LayerSent's blocks are read into that layer alone; the Ack frees the producer's."""
    port = free_port()
    roles = ("kv_producer", "kv_consumer")
    conns = [_connector(role, rank, port, layerwise=True) for rank, role in enumerate(roles)]
    for prod, cons in started_pair(conns):
        before = [t.clone() for t in cons.kv_tensors]
        cons.pull(PullJob("r", "t", [0, 9, 3], 12))
        ev = prod.events.get(timeout=10)
        assert (ev.kind, ev.transfer_id) == ("subscribe", "t"), ev
        prod.hold(HeldTransfer("t", [5, 1, 8], 12, 42, time.monotonic() + 60))
        for layer in range(LAYERS):  # a first chunk completes two blocks, the prompt's end the third
            prod.sender.put(LayerJob("layer", "t", 1, layer, 0, block_ids=(5, 1)))
        for layer in range(LAYERS):
            prod.sender.put(LayerJob("layer", "t", 1, layer, 2, block_ids=(8,)))
        prod.sender.put(LayerJob("done", "t", 1, first_token=42, num_blocks=3, prefill_end=time.monotonic()))
        ev = cons.events.get(timeout=10)
        assert (ev.kind, ev.first_token, ev.num_bytes) == ("received", 42, LAYERS * 3 * BLOCK_BYTES), ev
        for p, c, b in zip(prod.kv_tensors, cons.kv_tensors, before):
            assert torch.equal(c[:, [0, 9, 3]], p[:, [5, 1, 8]])
            others = [i for i in range(BLOCKS) if i not in (0, 9, 3)]
            assert torch.equal(c[:, others], b[:, others])
        kinds = sorted(prod.events.get(timeout=10).kind for _ in range(2))
        assert kinds == ["released", "streamed"] and not prod._held
        with pytest.raises(KVTransferError, match="out of range"):
            cons._read_layer(0, 0, [BLOCKS], [0], 1.0)


class _SlowManagerTensor:
    """A stand-in for a CPU tensor whose share_memory_() fails as when torch's shared-memory manager answers
    late."""

    def __init__(self, failures: int, message: str = "Shared memory manager connection has timed out"):
        self.failures, self.message, self.calls = failures, message, 0

    def share_memory_(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(self.message)


def test_share_memory_retries_a_late_shared_memory_manager():
    from meshserve.disagg.ipc_connector import SHM_MANAGER_ATTEMPTS, _share_memory

    late = _SlowManagerTensor(failures=SHM_MANAGER_ATTEMPTS - 1)
    _share_memory(late, wait_s=0.0)
    assert late.calls == SHM_MANAGER_ATTEMPTS
    gone = _SlowManagerTensor(failures=SHM_MANAGER_ATTEMPTS)
    with pytest.raises(RuntimeError, match="timed out"):
        _share_memory(gone, wait_s=0.0)
    other = _SlowManagerTensor(failures=1, message="unable to open shared memory object")  # not retried
    with pytest.raises(RuntimeError, match="unable to open"):
        _share_memory(other, wait_s=0.0)
    assert other.calls == 1
