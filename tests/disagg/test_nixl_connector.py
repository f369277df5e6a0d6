"""The nixl connector on its own (no engines): two connectors in one process read each other's pool over UCX.

The consumer's blocks equal the producer's byte for byte, other blocks are untouched, the producer frees its
blocks on the acknowledgement, and a read of a producer that is gone fails cleanly."""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import pytest
import torch

from meshserve.disagg.config import parse_kv_transfer_config
from meshserve.disagg.connector import HeldTransfer, PullJob
from meshserve.disagg.nixl_connector import block_descs, desc_indices, nixl_available
from tests.disagg.engine_pair import free_port, transfer_config

pytestmark = pytest.mark.skipif(
    not nixl_available(), reason="the NIXL library is not installed (pip install meshserve[nixl])"
)

LAYERS, BLOCKS, SHAPE = 3, 10, (4, 2, 8)  # block_size, kv heads, head dim


def test_block_descriptors_follow_the_pool_layout():
    pools = [torch.arange(2 * BLOCKS * 64, dtype=torch.float32).reshape(2, BLOCKS, *SHAPE) for _ in range(2)]
    block_len = pools[0][0, 0].numel() * 4
    descs = block_descs([p.data_ptr() for p in pools], 2, BLOCKS, block_len, 0)
    rows = desc_indices([7, 2], 2, 2, BLOCKS)
    # layer 0 K of blocks 7, 2, then layer 0 V, then layer 1 ...
    want = [p[part, b].data_ptr() for p in pools for part in range(2) for b in (7, 2)]
    assert descs[rows, 0].tolist() == want and set(descs[:, 1].tolist()) == {block_len}
    assert rows.dtype == np.int32
    with pytest.raises(Exception, match="out of range"):
        desc_indices([BLOCKS], 2, 2, BLOCKS)


def _pool(seed: int, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, BLOCKS, *SHAPE, generator=g).to(device) for _ in range(LAYERS)]


def _start_pair(devices: tuple[str, str] = ("cpu", "cpu")) -> list:
    """A producer (kv rank 0) and a consumer (1) in this process, their pools on devices."""
    from meshserve.disagg.nixl_connector import make_nixl_connector

    port = free_port()
    conns = [None, None]

    def start(rank, role):
        cfg = dict(transfer_config(role, rank, port, transfer_timeout_s=5, hold_timeout_s=60), kv_connector="nixl")
        conns[rank] = make_nixl_connector(parse_kv_transfer_config(cfg), _pool(rank, devices[rank]))
        conns[rank].start()

    threads = [threading.Thread(target=start, args=a) for a in ((0, "kv_producer"), (1, "kv_consumer"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(conns), "a connector did not start"
    return conns


@pytest.fixture()
def pair():
    conns = _start_pair()
    yield conns
    for c in reversed(conns):
        c.close()


@pytest.mark.gpu
def test_gpu_pools_register_as_vram_and_read_byte_identical():
    """On the device: pools on GPUs register as VRAM and a read moves GPU blocks (CUDA IPC / NVLink via UCX)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    second = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    prod, cons = _start_pair(("cuda:0", second))
    try:
        assert (prod.mem_type, cons.mem_type) == ("VRAM", "VRAM") and cons.dev_id == torch.device(second).index
        prod.hold(HeldTransfer("t", [5, 1, 8], 12, 42, time.monotonic() + 60))
        cons.pull(PullJob("r", "t", [0, 9, 3], 12))
        ev = _event(cons, 60)
        assert ev.kind == "received", ev
        for p, c in zip(prod.kv_tensors, cons.kv_tensors):
            assert torch.equal(c[:, [0, 9, 3]].cpu(), p[:, [5, 1, 8]].cpu())
    finally:
        for c in (cons, prod):
            c.close()


def _event(conn, timeout=10.0):
    return conn.events.get(timeout=timeout)


def test_a_read_copies_the_blocks_and_the_ack_frees_them(pair):
    prod, cons = pair
    before = [t.clone() for t in cons.kv_tensors]
    prod.hold(HeldTransfer("t", [5, 1, 8], 12, 42, time.monotonic() + 60))
    cons.pull(PullJob("r", "t", [0, 9, 3], 12))
    ev = _event(cons)
    assert (ev.kind, ev.first_token) == ("received", 42), ev
    assert ev.num_bytes == LAYERS * 2 * 3 * SHAPE[0] * SHAPE[1] * SHAPE[2] * 4
    for p, c, b in zip(prod.kv_tensors, cons.kv_tensors, before):
        assert torch.equal(c[:, [0, 9, 3]], p[:, [5, 1, 8]])
        others = [i for i in range(BLOCKS) if i not in (0, 9, 3)]
        assert torch.equal(c[:, others], b[:, others])  # nothing else written
    released = _event(prod)
    assert (released.kind, released.transfer_id, released.reason) == ("released", "t", "")
    assert not prod._held

    # a second pull of the same transfer: nobody holds it any more
    cons.pull(PullJob("r2", "t", [0, 9, 3], 12))
    ev = _event(cons)
    assert ev.kind == "failed" and "no producer holds" in ev.reason

    # two idle agents: their progress threads sleep between polls (NIXL's own delay, 0, spun ~a core each)
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(0.5)
    assert (time.process_time() - cpu) / (time.monotonic() - wall) < 0.3

    # close() destroys each agent (its progress thread polls without a pause) though the connectors live on;
    # the fixture's second close() is a no-op
    agents = [weakref.ref(c.agent) for c in (prod, cons)]
    for c in (cons, prod):
        c.close()
    assert [a() for a in agents] == [None, None] and cons.agent is None


def _producer_process(port: int, ready) -> None:
    """A producer connector alone in its own process (kv rank 1), holding transfer "t" (blocks 1, 2)."""
    from meshserve.disagg.nixl_connector import make_nixl_connector

    cfg = dict(transfer_config("kv_producer", 1, port, transfer_timeout_s=5, hold_timeout_s=60), kv_connector="nixl")
    conn = make_nixl_connector(parse_kv_transfer_config(cfg), _pool(0))
    conn.start()
    conn.hold(HeldTransfer("warm", [5], 4, 7, time.monotonic() + 60))
    conn.hold(HeldTransfer("t", [1, 2], 8, 7, time.monotonic() + 60))
    ready.set()
    time.sleep(120)  # until killed


def test_a_producer_that_dies_mid_transfer_fails_the_read_cleanly():
    import multiprocessing as mp

    from meshserve.disagg.nixl_connector import make_nixl_connector

    ctx = mp.get_context("spawn")
    port = free_port()
    ready = ctx.Event()
    proc = ctx.Process(target=_producer_process, args=(port, ready), daemon=True)
    proc.start()
    # the consumer is kv rank 0, the rendezvous store's host: the store outlives the producer
    cfg = dict(transfer_config("kv_consumer", 0, port, transfer_timeout_s=5), kv_connector="nixl")
    cons = make_nixl_connector(parse_kv_transfer_config(cfg), _pool(1))
    try:
        cons.start()
        assert ready.wait(120)
        cons.pull(PullJob("w", "warm", [6], 4))  # the producer's agent loaded, its connection up
        assert _event(cons, 30).kind == "received"
        orig = cons._read_blocks

        def read_after_the_producer_died(src, remote_ids, block_ids, timeout_s):
            proc.kill()  # granted, then gone before (or while) the consumer reads
            proc.join(10)
            return orig(src, remote_ids, block_ids, timeout_s)

        cons._read_blocks = read_after_the_producer_died
        t0 = time.monotonic()
        cons.pull(PullJob("r", "t", [3, 4], 8))
        ev = _event(cons, 30)
        assert ev.kind == "failed" and "NIXL read" in ev.reason, ev
        assert time.monotonic() - t0 < 10  # within transfer_timeout_s (5), not a hang
        assert 1 not in cons._peers  # the producer's description is loaded afresh next time
    finally:
        proc.kill()
        proc.join(10)
        cons.close()


def _consumer_process(port: int) -> None:
    """A consumer connector (kv rank 1) that reads transfer "t" and dies with the read in flight."""
    import os
    import signal

    from meshserve.disagg.nixl_connector import make_nixl_connector

    cfg = dict(transfer_config("kv_consumer", 1, port, transfer_timeout_s=1), kv_connector="nixl")
    conn = make_nixl_connector(parse_kv_transfer_config(cfg), _pool(1))
    conn.start()
    post = conn.agent.transfer

    def post_then_die(handle, *args):
        post(handle, *args)
        os.kill(os.getpid(), signal.SIGKILL)

    conn.agent.transfer = post_then_die
    conn.pull(PullJob("r", "t", [3, 4], 8))
    time.sleep(60)


def test_a_consumer_that_dies_mid_read_leaves_the_blocks_to_the_deadline():
    """No acknowledgement comes: the producer frees the blocks at transfer_timeout_s + hold_timeout_s after
    the grant, not before (the read may still be going)."""
    import multiprocessing as mp

    from meshserve.disagg.nixl_connector import make_nixl_connector

    port = free_port()
    cfg = dict(transfer_config("kv_producer", 0, port, transfer_timeout_s=1, hold_timeout_s=1), kv_connector="nixl")
    prod = make_nixl_connector(parse_kv_transfer_config(cfg), _pool(0))
    proc = mp.get_context("spawn").Process(target=_consumer_process, args=(port,), daemon=True)
    proc.start()
    try:
        # held before the consumer can ask: a pull that came first found nothing, and the consumer slept 60 s
        prod.hold(HeldTransfer("t", [1, 2], 8, 7, time.monotonic() + 60))
        prod.start()
        proc.join(120)
        assert proc.exitcode == -9  # it died with its read posted
        held = prod._held["t"]
        assert held.read_by == 1 and held.deadline - time.monotonic() < 2.5
        assert prod.expire(time.monotonic()) == []  # not yet: the read may still be going
        time.sleep(max(0.0, held.deadline - time.monotonic()) + 0.1)
        assert [h.transfer_id for h in prod.expire(time.monotonic())] == ["t"]  # the core frees them
        assert prod.events.empty()  # (no "released": the expiry is the core's own doing)
    finally:
        proc.kill()
        prod.close()


class _StuckRead:
    """A read handle NIXL cannot cancel: release raises until the read ends (never, unless told)."""

    def __init__(self, ends_after_polls: int | None):
        self.polls, self.ends_after_polls, self.released = 0, ends_after_polls, False

    def release(self):
        if self.ends_after_polls is None or self.polls < self.ends_after_polls:
            raise RuntimeError("NIXL_ERR_REPOST_ACTIVE")
        self.released = True

    def state(self) -> str:
        self.polls += 1
        return "PROC" if self.ends_after_polls is None or self.polls < self.ends_after_polls else "DONE"


@pytest.mark.parametrize("ends_after_polls", [3, None])
def test_a_read_that_cannot_be_cancelled_is_waited_for_or_its_blocks_retired(ends_after_polls, monkeypatch):
    from meshserve.disagg import nixl_connector as nc

    monkeypatch.setattr(nc, "CANCEL_WAIT_S", 0.05)
    conn = nc.NixlConnector.__new__(nc.NixlConnector)  # only the agent is used
    handle = _StuckRead(ends_after_polls)
    conn.agent = type("Agent", (), {"check_xfer_state": staticmethod(lambda h: h.state())})()
    assert conn._release_xfer(handle, src=0) is (ends_after_polls is not None)
    assert handle.released is (ends_after_polls is not None)
