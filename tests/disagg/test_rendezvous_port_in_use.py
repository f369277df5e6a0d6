"""The group's store on a kv_port already in use: one error naming kv_transfer_config.kv_port (torch's own
DistNetworkError names neither the flag nor the key)."""

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
