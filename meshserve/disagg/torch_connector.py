"""The "torch" connector: torch.distributed point-to-point send/recv, NCCL between GPUs, gloo on CPUs.

The transfer group is its own process group (not the engine's tensor/pipeline group): kv_parallel_size
instances meet in a TCPStore at kv_ip:kv_port (rendezvous.py: rank 0 hosts it), which also holds each rank's
role and side-channel address. Blocks travel one layer at a time (a layer's blocks gathered into one contiguous
tensor), with a few layers in flight, so the gather of layer i+1 overlaps the wire time of layer i.
gloo carries CPU tensors: GPU blocks are staged through host memory (across hosts without RDMA).
"""

from __future__ import annotations

import datetime
import logging
import re
import time

import torch
import torch.distributed as dist

from meshserve.disagg.connector import KVConnector
from meshserve.disagg.kv_blocks import gather_layer, layer_block_shape, scatter_layer
from meshserve.disagg.rendezvous import StoreRendezvous
from meshserve.errors import KVTransferError

logger = logging.getLogger(__name__)

LAYERS_IN_FLIGHT = 4  # staging memory: this many layers of one request's blocks per direction
_TAG = 25  # gloo matches send/recv by tag; NCCL ignores it (one ordered stream per pair)


class TorchConnector(StoreRendezvous, KVConnector):
    """KV blocks over torch.distributed send/recv (see the module docstring)."""

    name = "torch"

    def __init__(self, config, kv_tensors):
        super().__init__(config, kv_tensors)
        self.device = kv_tensors[0].device
        default = "nccl" if self.device.type == "cuda" else "gloo"
        self.backend = config.extra("backend", default)
        if self.backend == "nccl" and self.device.type != "cuda":
            raise KVTransferError(
                "kv_transfer_config: the nccl backend needs the KV cache on a GPU; use gloo"
            )
        self._stage_on_host = self.backend == "gloo" and self.device.type == "cuda"
        # the transfer threads' copies run on their own streams, beside the step's
        self._send_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._recv_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._broken: dict[int, str] = {}  # peers whose link failed mid-transfer: the pair's order is lost

    @property
    def transport(self) -> str:
        return f"torch.distributed/{self.backend}" + (
            " (staged through host memory)" if self._stage_on_host else ""
        )

    def _connect(self) -> None:
        c = self.config
        self._join_store()
        # first: a rank that never joins is then one error naming it, not the gloo constructor's store timeout
        self._wait_for_roles()
        prefixed = dist.PrefixStore("meshserve-kv", self.store)
        op_timeout = datetime.timedelta(seconds=max(c.transfer_timeout_s, 1.0))
        if self.backend == "gloo":
            # the constructor waits for every rank with this timeout (a peer still loading its model must not
            # fail the pair); each send/recv waits with its own, transfer_timeout_s (_wait)
            timeout = datetime.timedelta(seconds=c.init_timeout_s)
            self.group = dist.ProcessGroupGloo(prefixed, c.kv_rank, c.kv_parallel_size, timeout)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = op_timeout
            torch.cuda.set_device(self.device)
            self.group = dist.ProcessGroupNCCL(prefixed, c.kv_rank, c.kv_parallel_size, opts)

    def _thread_init(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _check_link(self, peer: int) -> None:
        if peer in self._broken:
            raise KVTransferError(
                f"the link to kv rank {peer} broke earlier ({self._broken[peer]}); "
                "restart the pair to transfer again"
            )

    def _wait(self, work, peer: int, timeout_s: float) -> None:
        try:
            ok = work.wait(datetime.timedelta(seconds=timeout_s))
        except Exception as e:
            self._broken[peer] = _reason(e)
            raise KVTransferError(f"transfer with kv rank {peer} failed: {self._broken[peer]}") from e
        if ok is False:
            self._broken[peer] = "timed out"
            raise KVTransferError(f"transfer with kv rank {peer} timed out after {timeout_s:.1f} s")

    def _send_blocks(self, dst: int, block_ids: list[int]) -> int:
        self._check_link(dst)
        timeout = self.config.transfer_timeout_s
        in_flight: list[tuple[object, torch.Tensor]] = []
        nbytes = 0
        for kv_layer in self.kv_tensors:
            with _maybe_stream(self._send_stream):
                data = gather_layer(kv_layer, block_ids)
                if self._stage_on_host:
                    data = data.cpu()
                elif self._send_stream is not None:
                    self._send_stream.synchronize()  # NCCL runs on its own stream: the gather must be done
            in_flight.append((self.group.send([data], dst, _TAG), data))
            nbytes += data.numel() * data.element_size()
            if len(in_flight) >= LAYERS_IN_FLIGHT:
                self._wait(in_flight.pop(0)[0], dst, timeout)
        for work, _ in in_flight:
            self._wait(work, dst, timeout)
        return nbytes

    def _send_layer(self, dst: int, data: torch.Tensor) -> int:
        self._check_link(dst)
        if self._stage_on_host:
            data = data.cpu()
        self._wait(self.group.send([data], dst, _TAG), dst, self.config.transfer_timeout_s)
        return data.numel() * data.element_size()

    def _recv_layer(self, src, kv_layer, block_ids, count, timeout_s) -> int:
        self._check_link(src)
        recv_device = torch.device("cpu") if self._stage_on_host else self.device
        buf = torch.empty(layer_block_shape(kv_layer, count), dtype=kv_layer.dtype, device=recv_device)
        with _maybe_stream(self._recv_stream):  # (NCCL: the wait orders this stream after the receive)
            self._wait(self.group.recv([buf], src, _TAG), src, timeout_s)
            if block_ids is not None:
                scatter_layer(kv_layer, block_ids, buf)
        if self._recv_stream is not None:
            self._recv_stream.synchronize()  # the blocks are whole before the request may be admitted
        return buf.numel() * buf.element_size()

    def _recv_blocks(self, src: int, block_ids: list[int], timeout_s: float) -> int:
        self._check_link(src)
        deadline = time.monotonic() + timeout_s
        recv_device = torch.device("cpu") if self._stage_on_host else self.device
        posted: list[tuple[object, torch.Tensor, torch.Tensor]] = []
        nbytes = 0

        def finish(work, buf, kv_layer) -> None:
            with _maybe_stream(self._recv_stream):  # (NCCL: the wait orders this stream after the receive)
                self._wait(work, src, max(0.1, deadline - time.monotonic()))
                scatter_layer(kv_layer, block_ids, buf)

        for kv_layer in self.kv_tensors:
            buf = torch.empty(
                layer_block_shape(kv_layer, len(block_ids)), dtype=kv_layer.dtype, device=recv_device
            )
            posted.append((self.group.recv([buf], src, _TAG), buf, kv_layer))
            nbytes += buf.numel() * buf.element_size()
            if len(posted) >= LAYERS_IN_FLIGHT:
                finish(*posted.pop(0))
        for item in posted:
            finish(*item)
        if self._recv_stream is not None:
            self._recv_stream.synchronize()  # the blocks are whole before the core may schedule them
        return nbytes


def _reason(e: Exception) -> str:
    """gloo's error in words a request's error can carry: "Connection closed by peer [127.0.0.1]:33411", without
    its source path ("[/__w/pytorch/.../pair.cc:553] ") and its advice to read the logs ("... GLHF!")."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\] ", "", text)
    return text.split(". This is typically")[0]


class _maybe_stream:
    """torch.cuda.stream(s) when s is a stream, nothing on CPUs."""

    def __init__(self, stream):
        self.ctx = torch.cuda.stream(stream) if stream is not None else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
