"""The "nixl" connector: NIXL (the transfer library of Dynamo and vLLM), optional (pip install meshserve[nixl]).

NIXL reads remote memory directly (UCX: RDMA, NVLink, CUDA IPC, shared memory or TCP, whichever the two hosts
have) and needs no matched send/recv and no process group. Each engine registers its KV pool tensors with a
NIXL agent at start and publishes, in the group's TCPStore (rendezvous.py), the agent's metadata and where
each layer's pool lies (AgentInfo). A consumer loads a producer's description once, then for each pull READs
the producer's blocks (named in the PullReply) straight into its own allocated blocks: one descriptor per
block, per K/V part, per layer, taken by index from two descriptor lists prepared once (the whole pools), so a
pull builds no descriptors. The read done, the side channel's Ack tells the producer to free its blocks.
GPU pools register as VRAM (GPUDirect RDMA / NVLink where UCX finds them), CPU pools as DRAM.
Layer-wise (layerwise.py): the producer announces each layer's blocks as its forward finishes them (LayerSent
names them) and the consumer's receiver thread reads that layer alone (`_read_layer`, the same prepared lists,
one layer's rows): consumer-driven READs rather than producer WRITEs, so the consumer alone ever writes its
blocks and giving up on a transfer stays its own decision (cancel, or retire what NIXL cannot cancel), and the
stream's flow, checks and faults are the torch connector's.
Where the library is absent, choosing this connector is a one-line start-up error.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import time
import uuid

import msgspec
import numpy as np
import torch

from meshserve.disagg.connector import KVConnector
from meshserve.disagg.nixl_agent import make_agent
from meshserve.disagg.rendezvous import StoreRendezvous
from meshserve.errors import KVTransferError

logger = logging.getLogger(__name__)

CANCEL_WAIT_S = 30.0  # how long a read NIXL could not cancel may take to end before its blocks are retired
_POLL_S = 0.0005  # between checks of a read in flight (the progress thread moves it meanwhile)


# the meta package `nixl` picks the CUDA variant; a variant alone (`nixl-cu12`, all meshserve[nixl] installs:
# the meta package pulls both variants) serves as well, its UCX plugin included
_PACKAGES = ("nixl", "nixl_cu12", "nixl_cu13")


def nixl_available() -> bool:
    return any(importlib.util.find_spec(p) is not None for p in _PACKAGES)


def nixl_api():
    """The NIXL Python API module (nixl_agent, nixl_agent_config) of whichever package is installed."""
    for p in _PACKAGES:
        if importlib.util.find_spec(p) is not None:
            return importlib.import_module(f"{p}._api")
    raise ImportError("no NIXL package is installed (pip install meshserve[nixl])")


def make_nixl_connector(config, kv_tensors):
    if not nixl_available():
        raise KVTransferError(
            'kv_transfer_config: kv_connector "nixl" needs the NIXL library, which is not '
            "installed (pip install meshserve[nixl], nixl-cu12); the \"torch\" connector "
            "(NCCL or gloo) works without it"
        )
    return NixlConnector(config, kv_tensors)


class AgentInfo(msgspec.Struct):
    """What a consumer needs to read an engine's blocks: its NIXL agent and its KV pool's layout."""

    name: str
    metadata: bytes  # nixl_agent.get_agent_metadata(): connection info and registered regions
    mem_type: str  # "VRAM" or "DRAM"
    dev_id: int
    layer_addrs: list[int]  # each layer's pool tensor's address
    parts: int  # leading K/V dimension of a layer's pool tensor (2: K and V)
    num_blocks: int
    block_len: int  # bytes of one block of one part of one layer


def pool_layout(kv_tensors: list[torch.Tensor]) -> tuple[int, int, int]:
    """(parts, num_blocks, block_len) of a pool whose layers are contiguous [parts, num_blocks, ...] tensors."""
    first = kv_tensors[0]
    for t in kv_tensors:
        if not t.is_contiguous() or t.shape != first.shape or t.dtype != first.dtype:
            raise KVTransferError(
                "kv_transfer_config: the nixl connector needs every layer's KV pool as one contiguous tensor "
                "of one shape and dtype"
            )
    return first.shape[0], first.shape[1], first[0, 0].numel() * first.element_size()


def block_descs(layer_addrs: list[int], parts: int, num_blocks: int, block_len: int, dev_id: int) -> np.ndarray:
    """Every block of a pool as NIXL descriptors (address, length, device): row (layer * parts + part) *
    num_blocks + block, the order desc_indices counts in."""
    base = np.asarray(layer_addrs, dtype=np.uint64)[:, None, None]
    offsets = np.arange(parts * num_blocks, dtype=np.uint64).reshape(1, parts, num_blocks) * np.uint64(block_len)
    addrs = (base + offsets).reshape(-1)
    descs = np.empty((addrs.size, 3), dtype=np.uint64)
    descs[:, 0] = addrs
    descs[:, 1] = block_len
    descs[:, 2] = dev_id
    return descs


def desc_indices(
    block_ids: list[int], num_layers: int, parts: int, num_blocks: int, first_layer: int = 0
) -> np.ndarray:
    """Rows of block_descs for block_ids (in their order) of num_layers layers from first_layer, every part:
    layer-major, then part."""
    ids = np.asarray(block_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= num_blocks):
        raise KVTransferError(f"block id out of range (pool of {num_blocks} blocks): {block_ids}")
    layer_parts = np.arange(first_layer * parts, (first_layer + num_layers) * parts, dtype=np.int64)
    rows = layer_parts[:, None] * num_blocks + ids[None, :]
    return rows.reshape(-1).astype(np.int32)


class _Peer:
    """A producer whose agent is loaded: its name and its prepared descriptor list."""

    def __init__(self, info: AgentInfo, dlist):
        self.info = info
        self.dlist = dlist


class NixlConnector(StoreRendezvous, KVConnector):
    """KV blocks read one-sided over NIXL (see the module docstring)."""

    name = "nixl"
    one_sided_read = True

    def __init__(self, config, kv_tensors):
        super().__init__(config, kv_tensors)
        api = nixl_api()

        self.device = kv_tensors[0].device
        self.mem_type = "VRAM" if self.device.type == "cuda" else "DRAM"
        self.dev_id = (self.device.index or 0) if self.device.type == "cuda" else 0
        self.parts, self.num_blocks, self.block_len = pool_layout(kv_tensors)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # (UCX binds a CUDA context when the agent starts)
        self.agent_name = f"meshserve-kv{config.kv_rank}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.agent = make_agent(api, self.agent_name, ["UCX"])  # (its progress thread sleeps when idle)
        if "UCX" not in self.agent.backends:
            raise KVTransferError("kv_transfer_config: NIXL found no UCX backend plugin here")
        self._reg = self.agent.register_memory(kv_tensors)  # a list of tensors: VRAM or DRAM from the device
        self._layer_addrs = [t.data_ptr() for t in kv_tensors]
        self._local_dlist = None  # prepared on the first read (consumers only)
        self._peers: dict[int, _Peer] = {}

    @property
    def transport(self) -> str:
        return f"NIXL/UCX one-sided READ ({self.mem_type})"

    def _connect(self) -> None:
        self._join_store()
        info = AgentInfo(
            self.agent_name,
            self.agent.get_agent_metadata(),
            self.mem_type,
            self.dev_id,
            self._layer_addrs,
            self.parts,
            self.num_blocks,
            self.block_len,
        )
        self._publish_address(msgspec.msgpack.encode(info), "nixl")
        self._wait_for_roles()

    def _thread_init(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    # -- consumer: its puller (or layer-wise receiver) thread alone uses the agent from here on --------------
    def _peer(self, rank: int) -> _Peer:
        peer = self._peers.get(rank)
        if peer is not None:
            return peer
        info = msgspec.msgpack.decode(self._peer_value(rank, "nixl"), type=AgentInfo)
        if (info.parts, info.block_len) != (self.parts, self.block_len) or len(info.layer_addrs) != len(
            self.kv_tensors
        ):
            raise KVTransferError(
                f"kv rank {rank}'s KV blocks differ from this engine's ({len(info.layer_addrs)} layers x "
                f"{info.parts} x {info.block_len} bytes here {len(self.kv_tensors)} x {self.parts} x "
                f"{self.block_len}): the two engines must run the same model, dtype and block size"
            )
        self.agent.add_remote_agent(info.metadata)
        descs = block_descs(info.layer_addrs, info.parts, info.num_blocks, info.block_len, info.dev_id)
        dlist = self.agent.prep_xfer_dlist(info.name, descs, info.mem_type)
        if self._local_dlist is None:
            local = block_descs(self._layer_addrs, self.parts, self.num_blocks, self.block_len, self.dev_id)
            self._local_dlist = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", local, self.mem_type)
        peer = self._peers[rank] = _Peer(info, dlist)
        logger.info("KV transfer: NIXL agent %s of kv rank %d loaded (%s)", info.name, rank, info.mem_type)
        return peer

    def _forget(self, rank: int) -> None:
        """Drop a peer after a failed read: the next pull loads its description afresh (it may have restarted)."""
        peer = self._peers.pop(rank, None)
        if peer is None:
            return
        try:
            peer.dlist.release()
            self.agent.remove_remote_agent(peer.info.name)
        except Exception as e:  # noqa: BLE001  (already broken: nothing more to undo)
            logger.debug("KV transfer: forgetting NIXL agent %s: %s", peer.info.name, e)

    def _read_blocks(self, src: int, remote_ids: list[int], block_ids: list[int], timeout_s: float) -> int:
        return self._read(src, remote_ids, block_ids, 0, len(self.kv_tensors), timeout_s)

    def _read_layer(
        self, src: int, layer: int, remote_ids: list[int], block_ids: list[int], timeout_s: float
    ) -> int:
        if not 0 <= layer < len(self.kv_tensors):
            raise KVTransferError(f"layer {layer} out of range ({len(self.kv_tensors)} layers)")
        return self._read(src, remote_ids, block_ids, layer, 1, timeout_s)

    def _read(
        self, src: int, remote_ids: list[int], block_ids: list[int], first_layer: int, num_layers: int,
        timeout_s: float,
    ) -> int:
        """Read rank src's blocks remote_ids into block_ids, of layers first_layer .. + num_layers - 1."""
        if len(remote_ids) != len(block_ids):
            raise KVTransferError(f"rank {src} holds {len(remote_ids)} blocks, {len(block_ids)} expected")
        what = f"NIXL read of {len(block_ids)} blocks from kv rank {src}"
        deadline = time.monotonic() + timeout_s
        try:
            peer = self._peer(src)
            local = desc_indices(block_ids, num_layers, self.parts, self.num_blocks, first_layer)
            remote = desc_indices(remote_ids, num_layers, peer.info.parts, peer.info.num_blocks, first_layer)
            handle = self.agent.make_prepped_xfer("READ", self._local_dlist, local, peer.dlist, remote)
        except KVTransferError:
            raise
        except Exception as e:  # a peer gone before the read began (its connection info is stale)
            self._forget(src)
            raise KVTransferError(f"{what} failed: {e}") from e
        try:
            state = self.agent.transfer(handle)
            while state == "PROC" and time.monotonic() < deadline and not self._stop.is_set():
                time.sleep(_POLL_S)
                state = self.agent.check_xfer_state(handle)
        except Exception as e:  # noqa: BLE001
            state = f"ERR, {e}"
        released = self._release_xfer(handle, src)
        if state != "DONE" or not released:
            self._forget(src)
            why = f"timed out after {timeout_s:.1f} s" if state == "PROC" else f"failed ({state})"
            error = KVTransferError(f"{what} {why}")
            error.blocks_unsafe = not released
            raise error
        return len(local) * self.block_len

    def _release_xfer(self, handle, src: int) -> bool:
        """Release a read's handle (which cancels it if unfinished). When NIXL cannot, wait up to CANCEL_WAIT_S
        for the read to end by itself and release it then. False when it may still write into the blocks."""
        try:
            handle.release()
            return True
        except Exception as e:  # noqa: BLE001
            first = e
        end = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < end:
            try:
                if self.agent.check_xfer_state(handle) != "PROC":
                    handle.release()
                    return True
            except Exception:  # noqa: BLE001  (still not releasable: keep waiting)
                pass
            time.sleep(_POLL_S)
        logger.error("KV transfer: a NIXL read from kv rank %d could not be cancelled (%s) and did not end in %.0f s: "
                     "its receiving blocks are retired", src, first, CANCEL_WAIT_S)
        return False

    def close(self) -> None:
        super().close()  # (the threads are done with the agent)
        if self.agent is None:
            return
        for rank in list(self._peers):
            self._forget(rank)
        try:
            if self._local_dlist is not None:
                self._local_dlist.release()
            self.agent.deregister_memory(self._reg)
        except Exception as e:  # noqa: BLE001
            logger.debug("KV transfer: NIXL clean-up: %s", e)
        # the agent's progress thread runs until the agent is destroyed: drop it and the handles holding it
        # now, not whenever this connector is collected (an engine, a test or a traceback may hold it on)
        self._local_dlist = self._reg = self.agent = None
