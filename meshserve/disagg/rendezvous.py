"""Where the engines of one transfer group meet: a TCPStore at kv_ip:kv_port, hosted by kv rank 0.

It holds each rank's role and the addresses it publishes (its side channel, its layer-wise stream socket, a
NIXL agent's description, the ipc connector's pool export). A connector mixes StoreRendezvous in to supply the KVConnector's address methods.
Each rank also publishes where its fp8 blocks keep V (kernels/kv_layout.py): blocks move as bytes, so a group
whose engines disagree fails at start with one error instead of reading V in the wrong order.
"""

from __future__ import annotations

import datetime
import json
import logging
import socket
import time

import torch.distributed as dist

from meshserve.errors import InvalidArgumentError, KVTransferError
from meshserve.kernels import kv_layout

logger = logging.getLogger(__name__)


class StoreRendezvous:
    """KVConnector's _publish_address / _peer_address / _producer_ranks over the group's TCPStore."""

    def _join_store(self) -> None:
        """Open (rank 0: host) the store and publish this rank's role; returns at once."""
        c = self.config
        if c.kv_rank != 0:
            _wait_for_store(c.kv_ip, c.kv_port, c.init_timeout_s)
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
            # (vLLM's NixlConnector needs no ranks: its users start every engine as rank 0, the default)
            raise InvalidArgumentError(f"kv_transfer_config.kv_port: rank 0 cannot host the group's store on "
                                       f"{c.kv_ip}:{c.kv_port} (address already in use); pick a free kv_port, "
                                       f"or, if another engine of the group is rank 0, give this one its own "
                                       f"kv_rank (1 to {c.kv_parallel_size - 1})",
                                       param="kv_transfer_config") from None
        self.store.set(f"v_layout/{c.kv_rank}", self._v_layout())  # before the role, which peers wait for
        self.store.set(f"kv_blocks/{c.kv_rank}", self._kv_blocks())
        self.store.set(f"role/{c.kv_rank}", c.kv_role)
        self.roles: dict[int, str] = {}

    def _v_layout(self) -> str:
        """This engine's V order in its pool's blocks: "transposed" for an fp8 pool (unless
        MESHSERVE_FP8_V_LAYOUT=rows), else "rows"."""
        tensors = getattr(self, "kv_tensors", None)
        return "transposed" if tensors and kv_layout.v_transposed(tensors[0]) else "rows"

    def _kv_blocks(self) -> str:
        """What one block of this engine's pool is, layer by layer (every dimension but the block count, and the
        dtype), as JSON: blocks move as bytes, so engines whose blocks differ must not pair (over gloo a size
        mismatch aborts the receiving process; same-size blocks of another layout would decode garbage)."""
        tensors = getattr(self, "kv_tensors", None) or []
        return json.dumps([[t.shape[0], *t.shape[2:], str(t.dtype).removeprefix("torch.")] for t in tensors])

    def _wait_for_roles(self) -> None:
        """Block until every rank of the group has joined (init_timeout_s)."""
        c = self.config
        keys = [f"role/{r}" for r in range(c.kv_parallel_size)]
        if not self.store.check(keys):  # (a start that waits minutes for the decode engine says so)
            logger.info("KV transfer: waiting up to %g s for the other kv ranks to join at %s:%d",
                        c.init_timeout_s, c.kv_ip, c.kv_port)
        try:
            self.store.wait(keys, datetime.timedelta(seconds=c.init_timeout_s))
        except dist.DistStoreError:  # torch's "wait timeout after 300000ms, keys: /role/1" names no rank
            missing = [r for r, key in enumerate(keys) if not self.store.check([key])]
            raise KVTransferError(
                f"kv_transfer_config: kv rank(s) {', '.join(map(str, missing))} of {c.kv_parallel_size} did not join "
                f"the group at {c.kv_ip}:{c.kv_port} within {c.init_timeout_s:g} s "
                "(kv_connector_extra_config.init_timeout_s): start them with the same kv_ip and kv_port"
            ) from None
        self.roles = {r: self.store.get(f"role/{r}").decode() for r in range(c.kv_parallel_size)}
        mine = self._v_layout()
        for r in range(c.kv_parallel_size):
            theirs = self.store.get(f"v_layout/{r}").decode()  # (set before its role: present by now)
            if theirs != mine:
                raise KVTransferError(
                    f"kv_transfer_config: kv rank {r} keeps V in its fp8 blocks {theirs}, this engine {mine} "
                    f"({kv_layout.ENV} must be the same on every engine of the group)"
                )
        mine = self._kv_blocks()
        for r in range(c.kv_parallel_size):
            theirs = self.store.get(f"kv_blocks/{r}").decode()
            if theirs != mine:
                raise KVTransferError(
                    f"kv_transfer_config: kv rank {r}'s KV blocks differ from this engine's ({_describe(theirs)} "
                    f"there, {_describe(mine)} here): every engine of the group must run the same model with "
                    "the same --block-size, --dtype and --kv-cache-dtype"
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


def _describe(kv_blocks: str) -> str:
    """_kv_blocks' JSON in words: "2 layers of [2, 16, 8, 64] bfloat16" (K/V, block size, heads, head size)."""
    layers = json.loads(kv_blocks)
    kinds = sorted({json.dumps(layer) for layer in layers})
    each = "; ".join(f"{json.loads(k)[:-1]} {json.loads(k)[-1]}" for k in kinds)
    return f"{len(layers)} layers of {each}"


def _wait_for_store(host: str, port: int, timeout_s: float) -> None:
    """Until kv rank 0's store accepts connections: torch's TCPStore client would retry by itself, but logs a
    C++ stack trace at every retry and ends in a message naming neither the rank nor the setting."""
    deadline = time.monotonic() + timeout_s
    logged = False
    while True:
        try:
            socket.create_connection((host, port), timeout=min(5.0, timeout_s)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise KVTransferError(
                    f"kv_transfer_config: kv rank 0 (the group's store at {host}:{port}) did not come up within "
                    f"{timeout_s:g} s (kv_connector_extra_config.init_timeout_s; last: {e.strerror or e}): start "
                    "it, or check kv_ip and kv_port"
                ) from None
            if not logged:
                logger.info("KV transfer: waiting up to %g s for kv rank 0's store at %s:%d", timeout_s, host, port)
                logged = True
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
