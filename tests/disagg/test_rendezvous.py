"""disagg/rendezvous.py: the group's store on a kv_port already in use is one error naming
kv_transfer_config.kv_port (torch's own DistNetworkError names neither the flag nor the key); engines whose fp8
pools keep V in different orders do not pair."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from meshserve.disagg.rendezvous import StoreRendezvous
from meshserve.errors import InvalidArgumentError


def test_rank_0_on_a_taken_kv_port_names_the_key():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        host = StoreRendezvous()
        host.config = SimpleNamespace(kv_ip="127.0.0.1", kv_port=port, kv_parallel_size=2, kv_rank=0,
                                      kv_role="kv_producer", init_timeout_s=5.0)
        with pytest.raises(InvalidArgumentError, match=f"kv_transfer_config.kv_port: .* 127.0.0.1:{port} "
                                                       r"\(address already in use\)"):
            host._join_store()


def _member(port: int, rank: int, kv_tensors):
    member = StoreRendezvous()
    member.config = SimpleNamespace(kv_ip="127.0.0.1", kv_port=port, kv_parallel_size=2, kv_rank=rank,
                                    kv_role="kv_producer" if rank == 0 else "kv_consumer", init_timeout_s=5.0)
    member.kv_tensors = kv_tensors
    return member


def test_engines_that_keep_fp8_v_in_different_orders_do_not_pair(monkeypatch):
    # MESHSERVE_FP8_V_LAYOUT (kernels/kv_layout.py): blocks move as bytes, so a pair whose fp8 pools keep V in
    # different orders must fail at start, naming the switch (a 16-bit pool is "rows" whatever the switch)
    import torch

    from meshserve.errors import KVTransferError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = [torch.zeros(2, 4, 16, 2, 8, dtype=torch.float8_e4m3fn)]
    monkeypatch.setenv("MESHSERVE_FP8_V_LAYOUT", "rows")
    host = _member(port, 0, pool)
    host._join_store()
    monkeypatch.setenv("MESHSERVE_FP8_V_LAYOUT", "transposed")
    peer = _member(port, 1, pool)
    peer._join_store()
    with pytest.raises(KVTransferError, match="kv rank 0 keeps V in its fp8 blocks rows, this engine transposed"):
        peer._wait_for_roles()
    monkeypatch.setenv("MESHSERVE_FP8_V_LAYOUT", "rows")
    with pytest.raises(KVTransferError, match="MESHSERVE_FP8_V_LAYOUT must be the same"):
        host._wait_for_roles()
    # bf16 pools: the switch does not touch them, so the same two settings pair
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bf16 = [torch.zeros(2, 4, 16, 2, 8, dtype=torch.bfloat16)]
    host = _member(port, 0, bf16)
    host._join_store()
    monkeypatch.setenv("MESHSERVE_FP8_V_LAYOUT", "transposed")
    peer = _member(port, 1, bf16)
    peer._join_store()
    peer._wait_for_roles()
    assert peer.roles == {0: "kv_producer", 1: "kv_consumer"}
