"""The producer's report of a layer-wise stream ("streamed": bytes, overlap) comes before the consumer's Ack
frees the blocks ("released"), however late the sender thread runs after its StreamDone: the consumer may
acknowledge at once, and a one-sided (NIXL) stream's report is made from that very Ack. Connectors alone, both
in this process: gloo (two-sided) and NIXL/UCX where installed (one-sided)."""

from __future__ import annotations

import threading
import time

import pytest

from meshserve.disagg import side_channel as sc
from meshserve.disagg.config import parse_kv_transfer_config
from meshserve.disagg.connector import HeldTransfer, PullJob
from meshserve.disagg.kv_blocks import gather_layer
from meshserve.disagg.layerwise import LayerJob
from meshserve.disagg.nixl_connector import nixl_available
from tests.disagg.engine_pair import free_port, started_pair, transfer_config
from tests.disagg.test_nixl_layerwise import LAYERS, _pool

NO_NIXL = pytest.mark.skipif(not nixl_available(), reason="the NIXL library is not installed")


def _connector(kind: str, role: str, rank: int, port: int):
    cfg = transfer_config(
        role, rank, port, connector=kind, layerwise=True, transfer_timeout_s=10, hold_timeout_s=60
    )
    config = parse_kv_transfer_config(cfg)
    if kind == "nixl":
        from meshserve.disagg.nixl_connector import make_nixl_connector

        return make_nixl_connector(config, _pool(rank))
    from meshserve.disagg.torch_connector import TorchConnector

    return TorchConnector(config, _pool(rank))


@pytest.fixture(params=["torch", pytest.param("nixl", marks=NO_NIXL)])
def pair(request):
    port = free_port()
    roles = ("kv_producer", "kv_consumer")
    conns = [_connector(request.param, role, rank, port) for rank, role in enumerate(roles)]
    yield from started_pair(conns)


class _HeldAfterStreamDone:
    """The sender's socket to the consumer: after a StreamDone, the sender thread is kept from its next line
    until the consumer's Ack made the producer release the blocks (as when the OS runs other threads
    first)."""

    def __init__(self, sock, released: threading.Event):
        self.sock, self.released = sock, released

    def send(self, data: bytes) -> None:
        self.sock.send(data)
        if isinstance(sc.decoder.decode(data), sc.StreamDone):
            self.released.wait(10)

    def close(self, linger: int = 0) -> None:
        self.sock.close(linger=linger)


def test_the_stream_is_reported_before_its_blocks_are_released(pair):
    prod, cons = pair
    released = threading.Event()
    put = prod.events.put

    def watch(event, *args, **kwargs):
        put(event, *args, **kwargs)
        if event.kind == "released":
            released.set()

    prod.events.put = watch
    socket = prod.sender._socket
    prod.sender._socket = lambda dst: _HeldAfterStreamDone(socket(dst), released)

    cons.pull(PullJob("r", "t", [0, 9], 8))
    ev = prod.events.get(timeout=10)
    assert (ev.kind, ev.transfer_id) == ("subscribe", "t"), ev
    prod.hold(HeldTransfer("t", [5, 1], 8, 42, time.monotonic() + 60))
    for layer in range(LAYERS):
        data = None if prod.one_sided_read else gather_layer(prod.kv_tensors[layer], [5, 1])
        prod.sender.put(LayerJob("layer", "t", 1, layer, 0, data, block_ids=(5, 1)))
    prefill_end = time.monotonic() + 100
    prod.sender.put(LayerJob("done", "t", 1, first_token=42, num_blocks=2, prefill_end=prefill_end))
    ev = cons.events.get(timeout=10)
    assert (ev.kind, ev.first_token) == ("received", 42), ev
    assert released.wait(10)
    kinds = [prod.events.get(timeout=10).kind for _ in range(2)]
    assert kinds == ["streamed", "released"]
    assert not prod.sender.announced
