"""Layer-wise streaming over the nixl connector, connectors alone (no engines): the producer announces each
layer's blocks, the consumer reads them one layer at a time into its own blocks; the producer's overlap metric
comes from the consumer's Ack; a read that cannot be cancelled retires the consumer's blocks; a producer that
dies mid-stream fails the transfer at the next read, well before the deadline."""

from __future__ import annotations

import time

import pytest
import torch

from meshserve.disagg.config import parse_kv_transfer_config
from meshserve.disagg.connector import HeldTransfer, PullJob
from meshserve.disagg.layerwise import LayerJob
from meshserve.disagg.nixl_connector import desc_indices, nixl_available
from meshserve.errors import KVTransferError
from tests.disagg.engine_pair import free_port, started_pair, transfer_config

pytestmark = pytest.mark.skipif(
    not nixl_available(), reason="the NIXL library is not installed (pip install meshserve[nixl])"
)

LAYERS, BLOCKS, SHAPE = 3, 10, (4, 2, 8)  # block_size, kv heads, head dim
BLOCK_BYTES = 2 * SHAPE[0] * SHAPE[1] * SHAPE[2] * 4  # one block of one layer, K and V


def _pool(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, BLOCKS, *SHAPE, generator=g) for _ in range(LAYERS)]


def _connector(role: str, rank: int, port: int, timeout_s: float = 5.0):
    from meshserve.disagg.nixl_connector import make_nixl_connector

    cfg = transfer_config(
        role, rank, port, connector="nixl", layerwise=True, transfer_timeout_s=timeout_s, hold_timeout_s=60
    )
    return make_nixl_connector(parse_kv_transfer_config(cfg), _pool(rank))


@pytest.fixture()
def pair():
    port = free_port()
    conns = [_connector("kv_producer", 0, port), _connector("kv_consumer", 1, port)]
    yield from started_pair(conns)


def _layer(tid: str, layer: int, start: int, ids: tuple[int, ...], dst: int = 1) -> LayerJob:
    return LayerJob("layer", tid, dst, layer, start, block_ids=ids)


def _subscribed(prod, tid: str) -> None:
    ev = prod.events.get(timeout=10)
    assert (ev.kind, ev.transfer_id, ev.peer) == ("subscribe", tid, 1), ev


def test_desc_indices_of_one_layer_are_that_layers_rows_of_the_whole():
    whole = desc_indices([7, 2], LAYERS, 2, BLOCKS)
    for layer in range(LAYERS):
        rows = desc_indices([7, 2], 1, 2, BLOCKS, first_layer=layer)
        assert rows.tolist() == whole[layer * 4 : (layer + 1) * 4].tolist()


def test_each_announced_layer_is_read_and_the_ack_carries_when(pair):
    prod, cons = pair
    before = [t.clone() for t in cons.kv_tensors]
    cons.pull(PullJob("r", "t", [0, 9, 3], 12))
    _subscribed(prod, "t")
    prod.hold(HeldTransfer("t", [5, 1, 8], 12, 42, time.monotonic() + 60))
    for layer in range(LAYERS):  # a first chunk completes two blocks, the prompt's end the third
        prod.sender.put(_layer("t", layer, 0, (5, 1)))
    for layer in range(LAYERS):
        prod.sender.put(_layer("t", layer, 2, (8,)))
    prefill_end = time.monotonic() + 100  # (a prefill still running when every read ended)
    prod.sender.put(LayerJob("done", "t", 1, first_token=42, num_blocks=3, prefill_end=prefill_end))
    ev = cons.events.get(timeout=10)
    assert (ev.kind, ev.first_token, ev.num_bytes) == ("received", 42, LAYERS * 3 * BLOCK_BYTES), ev
    for p, c, b in zip(prod.kv_tensors, cons.kv_tensors, before):
        assert torch.equal(c[:, [0, 9, 3]], p[:, [5, 1, 8]])
        others = [i for i in range(BLOCKS) if i not in (0, 9, 3)]
        assert torch.equal(c[:, others], b[:, others])  # nothing else written
    streamed, released = prod.events.get(timeout=10), prod.events.get(timeout=10)
    assert (streamed.kind, streamed.num_bytes) == ("streamed", LAYERS * 3 * BLOCK_BYTES), streamed
    # the reads, mapped onto the producer's clock, all fell before prefill_end: all of it overlapped
    assert 0 < streamed.seconds == pytest.approx(streamed.ended - streamed.started)
    assert streamed.started < streamed.ended <= time.monotonic()
    assert (released.kind, released.transfer_id, released.reason) == ("released", "t", "")
    assert not prod._held and not prod.sender.announced


def test_a_read_nixl_cannot_cancel_retires_the_blocks(pair):
    prod, cons = pair

    def stuck(src, layer, remote_ids, block_ids, timeout_s):
        error = KVTransferError("NIXL read of 1 blocks from kv rank 0 timed out")
        error.blocks_unsafe = True
        raise error

    cons._read_layer = stuck
    cons.pull(PullJob("r", "t", [4], 4))
    _subscribed(prod, "t")
    prod.hold(HeldTransfer("t", [2], 4, 7, time.monotonic() + 60))
    prod.sender.put(_layer("t", 0, 0, (2,)))
    ev = cons.events.get(timeout=10)
    assert ev.kind == "failed" and ev.retire_blocks and "timed out" in ev.reason, ev
    released = prod.events.get(timeout=10)  # the Ack (not ok) frees the producer's blocks
    assert released.kind == "released" and released.reason and not prod._held


def _producer_process(port: int, ready) -> None:
    """A layer-wise producer (kv rank 1) in its own process: once subscribed to "t", it announces layer 0 of
    block 1 for "t" and then, on the consumer's word, layer 1 (the consumer kills it before reading that)."""
    prod = _connector("kv_producer", 1, port)
    prod.start()
    ready.set()
    assert prod.events.get(timeout=60).kind == "subscribe"
    prod.hold(HeldTransfer("t", [1], 4, 7, time.monotonic() + 60))
    for layer in range(2):
        prod.sender.put(_layer("t", layer, 0, (1,), dst=0))
    time.sleep(120)  # until killed


def test_a_producer_that_dies_mid_stream_fails_the_transfer_at_the_next_read():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    ready = ctx.Event()
    proc = ctx.Process(target=_producer_process, args=(port, ready), daemon=True)
    proc.start()
    # the consumer is kv rank 0, the rendezvous store's host: the store outlives the producer
    cons = _connector("kv_consumer", 0, port, timeout_s=20)
    try:
        cons.start()
        assert ready.wait(120)
        orig, reads = cons._read_layer, []

        def read(src, layer, remote_ids, block_ids, timeout_s):
            reads.append(layer)
            if layer == 1:  # layer 0 read (the producer's agent loaded); gone before layer 1's read
                proc.kill()
                proc.join(10)
            return orig(src, layer, remote_ids, block_ids, timeout_s)

        cons._read_layer = read
        t0 = time.monotonic()
        cons.pull(PullJob("r", "t", [3], 4))
        ev = cons.events.get(timeout=60)
        assert ev.kind == "failed" and "NIXL read" in ev.reason and not ev.retire_blocks, ev
        assert reads == [0, 1] and time.monotonic() - t0 < 15  # the read failed, not the 20 s deadline
        assert 1 not in cons._peers  # its description is loaded afresh next time
    finally:
        proc.kill()
        proc.join(10)
        cons.close()
