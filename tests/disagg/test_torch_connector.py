"""disagg/torch_connector.py: a producer that dies mid-transfer fails the pull at once with gloo's reason in
words (not its source path and advice), and later pulls from it fail naming the broken link, never hang."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import torch

from meshserve.disagg.config import parse_kv_transfer_config
from meshserve.disagg.connector import HeldTransfer, PullJob
from meshserve.disagg.torch_connector import TorchConnector
from tests.disagg.engine_pair import free_port, join, transfer_config

LAYERS = 4


def _pool(fill: float) -> list[torch.Tensor]:
    return [torch.full((2, 16, 4, 2, 8), fill) for _ in range(LAYERS)]


def _dying_producer(port: int) -> None:
    """Holds transfer "t"; sends the first layer of it, then its process dies."""
    from meshserve.disagg.kv_blocks import gather_layer

    cfg = parse_kv_transfer_config(transfer_config("kv_producer", 0, port, transfer_timeout_s=5, init_timeout_s=60))
    conn = TorchConnector(cfg, _pool(1.0))

    def send_one_layer_and_die(dst: int, block_ids: list[int]) -> int:
        conn.group.send([gather_layer(conn.kv_tensors[0], block_ids)], dst, 25).wait()
        os._exit(1)

    conn._send_blocks = send_one_layer_and_die
    conn.hold(HeldTransfer("t", list(range(10)), 40, 7, time.monotonic() + 60))
    conn.start()
    time.sleep(60)


def test_a_producer_that_dies_mid_transfer_fails_the_pull_cleanly():
    port = free_port()
    proc = mp.get_context("spawn").Process(target=_dying_producer, args=(port,), daemon=True)
    proc.start()
    cfg = parse_kv_transfer_config(transfer_config("kv_consumer", 1, port, transfer_timeout_s=5, init_timeout_s=60))
    conn = TorchConnector(cfg, _pool(0.0))
    try:
        conn.start()
        t0 = time.monotonic()
        conn.pull(PullJob("r1", "t", list(range(10)), 40, remote_rank=0))
        event = conn.events.get(timeout=30)
        assert event.kind == "failed" and time.monotonic() - t0 < 10
        # the reason a request's error carries: gloo's words, without "[/__w/.../pair.cc:553]" and "... GLHF!"
        assert event.reason.startswith("transfer with kv rank 0 failed: ") and ".cc:" not in event.reason
        assert "GLHF" not in event.reason and "\n" not in event.reason
        conn.pull(PullJob("r2", "t", list(range(10)), 40, remote_rank=0))
        event = conn.events.get(timeout=30)
        assert event.kind == "failed"
    finally:
        conn.close()
        join(proc, 5)
        if proc.is_alive():
            proc.kill()
