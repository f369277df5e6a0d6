"""Where the engines of one transfer group meet: a TCPStore at kv_ip:kv_port, hosted by kv rank 0.

It holds each rank's role and the addresses it publishes (its side channel, its layer-wise stream socket, a
NIXL agent's description, the ipc connector's pool export). A connector mixes StoreRendezvous in to supply the KVConnector's address methods.
Each rank also publishes where its fp8 blocks keep V (kernels/kv_layout.py): blocks move as bytes, so a group
whose engines disagree fails at start with one error instead of reading V in the wrong order.
"""

from __future__ import annotations

import datetime

import torch.distributed as dist

from meshserve.errors import InvalidArgumentError, KVTransferError
from meshserve.kernels import kv_layout


class StoreRendezvous:
    """KVConnector's _publish_address / _peer_address / _producer_ranks over the group's TCPStore."""

    def _join_store(self) -> None:
        """Open (rank 0: host) the store and publish this rank's role; returns at once."""
        c = self.config
        try:
            self.store = dist.TCPStore(
                c.kv_ip,
                c.kv_port,
                c.kv_parallel_size,
                is_master=c.kv_rank == 0,
                timeout=datetime.timedelta(seconds=c.init_timeout_s),
                wait_for_workers=False,
            )
        except dist.DistNetworkError as e:  # rank 0's port taken: torch's message names neither flag nor key
            if c.kv_rank != 0 or "EADDRINUSE" not in str(e):
                raise
            raise InvalidArgumentError(f"kv_transfer_config.kv_port: rank 0 cannot host the group's store on "
                                       f"{c.kv_ip}:{c.kv_port} (address already in use); pick a free kv_port",
                                       param="kv_transfer_config") from None
        self.store.set(f"v_layout/{c.kv_rank}", self._v_layout())  # before the role, which peers wait for
        self.store.set(f"role/{c.kv_rank}", c.kv_role)
        self.roles: dict[int, str] = {}

    def _v_layout(self) -> str:
        """This engine's V order in its pool's blocks: "transposed" for an fp8 pool (unless
        MESHSERVE_FP8_V_LAYOUT=rows), else "rows"."""
        tensors = getattr(self, "kv_tensors", None)
        return "transposed" if tensors and kv_layout.v_transposed(tensors[0]) else "rows"

    def _wait_for_roles(self) -> None:
        """Block until every rank of the group has joined (init_timeout_s)."""
        c = self.config
        self.store.wait(
            [f"role/{r}" for r in range(c.kv_parallel_size)], datetime.timedelta(seconds=c.init_timeout_s)
        )
        self.roles = {r: self.store.get(f"role/{r}").decode() for r in range(c.kv_parallel_size)}
        mine = self._v_layout()
        for r in range(c.kv_parallel_size):
            theirs = self.store.get(f"v_layout/{r}").decode()  # (set before its role: present by now)
            if theirs != mine:
                raise KVTransferError(
                    f"kv_transfer_config: kv rank {r} keeps V in its fp8 blocks {theirs}, this engine {mine} "
                    f"({kv_layout.ENV} must be the same on every engine of the group)"
                )

    def _publish_address(self, address: str | bytes, kind: str = "side_channel") -> None:
        self.store.set(f"{kind}/{self.rank}", address)

    def _peer_value(self, rank: int, kind: str) -> bytes:
        key = f"{kind}/{rank}"
        self.store.wait([key], datetime.timedelta(seconds=self.config.init_timeout_s))
        return self.store.get(key)

    def _peer_address(self, rank: int, kind: str = "side_channel") -> str:
        return self._peer_value(rank, kind).decode()

    def _producer_ranks(self) -> list[int]:
        return [r for r, role in sorted(self.roles.items()) if role in ("kv_producer", "kv_both")]
