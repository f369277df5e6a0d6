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
        # (a vLLM NixlConnector user starts both engines without kv_rank: both are rank 0, the default)
        with pytest.raises(InvalidArgumentError, match=f"kv_transfer_config.kv_port: .* 127.0.0.1:{port} "
                                                       r"\(address already in use\); pick a free kv_port, or, if "
                                                       r"another engine of the group is rank 0, give this one its "
                                                       r"own kv_rank \(1 to 1\)"):
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


@pytest.mark.parametrize("theirs, what", [
    ({"dtype": "float32"}, r"2 layers of \[2, 16, 2, 8\] float32 there, 2 layers of \[2, 16, 2, 8\] bfloat16 here"),
    ({"block_size": 32}, r"\[2, 32, 2, 8\] bfloat16 there"),
    ({"num_layers": 3}, r"3 layers of .* there, 2 layers"),
])
def test_engines_whose_kv_blocks_differ_do_not_pair(theirs, what):
    # blocks move as bytes: over gloo a size mismatch aborted the decode engine's process at its first transfer
    # (gloo's EnforceNotMet); now both engines refuse at start, saying which flags must agree
    import torch

    from meshserve.errors import KVTransferError

    def pool(dtype="bfloat16", block_size=16, num_layers=2):
        return [torch.zeros(2, 4, block_size, 2, 8, dtype=getattr(torch, dtype)) for _ in range(num_layers)]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = _member(port, 0, pool(**theirs))
    host._join_store()
    peer = _member(port, 1, pool())
    peer._join_store()
    with pytest.raises(KVTransferError, match=f"kv rank 0's KV blocks differ from this engine's .*{what}.*"
                                              "same --block-size, --dtype and --kv-cache-dtype"):
        peer._wait_for_roles()
    with pytest.raises(KVTransferError, match="kv rank 1's KV blocks differ"):
        host._wait_for_roles()


def test_pools_that_differ_only_in_block_count_pair():
    # each engine sizes its pool to its own memory: only a block's layout must agree
    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = _member(port, 0, [torch.zeros(2, 100, 16, 2, 8)])
    host._join_store()
    peer = _member(port, 1, [torch.zeros(2, 7, 16, 2, 8)])
    peer._join_store()
    peer._wait_for_roles()
    host._wait_for_roles()


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_decode_engine_whose_store_never_comes_fails_naming_rank_0_and_the_timeout():
    # torch's TCPStore client retried by itself, logging a C++ stack trace at each retry, and ended in "The
    # client socket has timed out after 300000ms while trying to connect to (...)"
    from meshserve.errors import KVTransferError

    port = _unused_port()
    peer = _member(port, 1, [])
    peer.config.init_timeout_s = 0.5
    with pytest.raises(KVTransferError, match=rf"kv rank 0 \(the group's store at 127.0.0.1:{port}\) did not come "
                                              r"up within 0.5 s \(kv_connector_extra_config.init_timeout_s"):
        peer._join_store()


def test_a_rank_that_never_joins_is_named():
    # torch's own message was "wait timeout after 500ms, keys: /role/1"
    from meshserve.errors import KVTransferError

    host = _member(_unused_port(), 0, [])
    host.config.init_timeout_s = 0.5
    host._join_store()
    with pytest.raises(KVTransferError, match=r"kv rank\(s\) 1 of 2 did not join the group at .* within 0.5 s"):
        host._wait_for_roles()
