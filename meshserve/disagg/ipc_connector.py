"""The "ipc" connector: a producer and a consumer on one host read each other's KV pool through mapped memory.

On one GPU (two processes sharing it) or peer GPUs of one host, neither NCCL (no two ranks on one device) nor
NIXL (UCX turns cuda-ipc off without NVLink: TCP through host memory) moves KV device to device. Here each
engine exports its pool tensors once at start with torch.multiprocessing's reductions (a CUDA tensor becomes
a cudaIpc handle + offset, a CPU tensor a shared-memory file name) and publishes them in the group's TCPStore
with its host id, pid and GPU UUID (device indices differ under CUDA_VISIBLE_DEVICES); a consumer maps each
producer's pool once, at start (a producer that exited is mapped afresh from its restart's export), and each
transfer is a one-sided read, the nixl connector's flow: the PullReply (or, layer-wise, each LayerSent) names
the producer's blocks, the consumer copies them into its own blocks on a side CUDA stream (slices where the
ids run together, else a gather and a scatter) and the Ack frees them.
Ordering needs no events across processes: the producer grants a request's blocks only once its step ended
(the sampled token synchronised it) and announces a layer only once that layer's event was reached.
The producer's pool tensors live as long as its engine, so the mappings stay valid; the consumer only drops
its mapping (never frees the memory). CPU pools are moved into shared memory in place at start (the same
tensors, so the layers' bindings hold), shared by file name (torch_shm_manager, started by torch, unlinks them
when the last process using them exits). A peer on another host is a one-line start-up error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import select
import socket
import threading
import time
from multiprocessing.reduction import ForkingPickler

import msgspec
import torch
import torch.multiprocessing as tmp
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from meshserve.disagg.connector import KVConnector
from meshserve.disagg.rendezvous import StoreRendezvous
from meshserve.errors import KVTransferError
from meshserve.host_lists import pack_int64_ids, to_device

logger = logging.getLogger(__name__)

MAX_SLICE_COPIES = 8  # a read whose blocks form at most this many runs copies slices (one pass), else gathers
_sharing_lock = threading.Lock()
_CUDA_DEVICE_ARG = 6  # rebuild_cuda_tensor's device argument in reduce_tensor's tuple


def host_id() -> str:
    """This host as peers compare it: its name and its boot id (two containers of one host share the boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


class PoolExport(msgspec.Struct):
    """What a consumer needs to map an engine's pool: the pickled reductions of its layer tensors."""

    host: str
    pid: int
    device_uuid: str  # the GPU's UUID ("" for CPU): device indices differ with CUDA_VISIBLE_DEVICES
    layers: list[bytes]  # one ForkingPickler dump of reduce_tensor(layer) per layer


@contextlib.contextmanager
def _file_system_sharing():
    """CPU storages shared by file name (by file descriptor, the default, reaches only this process's
    children)."""
    with _sharing_lock:
        before = tmp.get_sharing_strategy()
        tmp.set_sharing_strategy("file_system")
        try:
            yield
        finally:
            tmp.set_sharing_strategy(before)


def _device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else ""


def share_pool(kv_tensors: list[torch.Tensor]) -> None:
    """Move a CPU pool into shared memory in place (no-op on GPUs and for storages already shared)."""
    if kv_tensors[0].device.type != "cpu":
        return
    need = sum(t.untyped_storage().nbytes() for t in kv_tensors if not t.is_shared())
    if need and os.path.isdir("/dev/shm"):
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize < need:
            raise KVTransferError(
                f"kv_transfer_config: the ipc connector shares the CPU KV pool ({need / 2**20:.0f} MiB) "
                f"through /dev/shm, which has {st.f_bavail * st.f_frsize / 2**20:.0f} MiB free"
            )
    with _file_system_sharing():
        for t in kv_tensors:
            _share_memory(t)
    if not all(t.is_shared() for t in kv_tensors):
        raise KVTransferError(
            "kv_transfer_config: the ipc connector could not move the CPU KV pool into shared memory"
        )


SHM_MANAGER_ATTEMPTS = 3


def _share_memory(t: torch.Tensor, attempts: int = SHM_MANAGER_ATTEMPTS, wait_s: float = 1.0) -> None:
    """t.share_memory_() under the file_system strategy, which goes through torch's shared-memory manager, a
    daemon the first call starts: on a loaded machine its first answer can miss libshm's timeout ("Shared memory
    manager connection has timed out": CI, 2026-12-04, five ipc tests at once), so that error is retried."""
    for attempt in range(1, attempts + 1):
        try:
            t.share_memory_()
            return
        except RuntimeError as e:
            if "Shared memory manager" not in str(e) or attempt == attempts:
                raise
            logger.warning("ipc: torch's shared-memory manager did not answer (attempt %d of %d); retrying",
                           attempt, attempts)
            time.sleep(wait_s)


def export_pool(kv_tensors: list[torch.Tensor]) -> PoolExport:
    device = kv_tensors[0].device
    layers = []
    try:
        with _file_system_sharing():
            for t in kv_tensors:
                buf = io.BytesIO()
                ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(reduce_tensor(t))
                layers.append(buf.getvalue())
    except Exception as e:  # e.g. memory the CUDA driver cannot export (expandable segments on an old torch)
        raise KVTransferError(f"kv_transfer_config: the ipc connector cannot export this KV pool: {e}") from e
    return PoolExport(host_id(), os.getpid(), _device_uuid(device), layers)


def _local_device(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise KVTransferError(f"the producer's GPU {uuid} is not visible to this process (CUDA_VISIBLE_DEVICES)")


def map_pool(export: PoolExport) -> list[torch.Tensor]:
    """The producer's layer tensors, mapped into this process (rebuilt from their reductions)."""
    device = _local_device(export.device_uuid) if export.device_uuid else None
    tensors = []
    for blob in export.layers:
        rebuild, args = pickle.loads(blob)
        if device is not None and rebuild is rebuild_cuda_tensor:
            args = (*args[:_CUDA_DEVICE_ARG], device, *args[_CUDA_DEVICE_ARG + 1 :])
        tensors.append(rebuild(*args))
    return tensors


def _alive(pid: int) -> bool:
    """Whether process pid still runs (a mapping of an exited producer's pool holds stale memory); a zombie
    (killed, not yet reaped by its parent) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # (no /proc: ask the kernel whether the pid exists)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


class ProcessWatch:
    """Whether a producer process still runs, asked before each read: through a pidfd (readable once the process
    has exited, a zombie included), ~1 us a question against ~22 us for reading /proc/pid/stat on the CPU machine
    (~3.5x that on the H200's host, where a 1 GiB read is ~0.55 ms of copy); _alive where there is no pidfd."""

    def __init__(self, pid: int):
        self.pid = pid
        self._fd: int | None = None
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._gone = True
            return
        except (AttributeError, OSError):  # (no pidfd: an old kernel, or not Linux)
            pass
        self._gone = False
        if self._fd is not None:
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLIN)

    def alive(self) -> bool:
        if self._gone:
            return False
        self._gone = bool(self._poll.poll(0)) if self._fd is not None else not _alive(self.pid)
        return not self._gone

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._gone = True


def _runs(src: list[int], dst: list[int], limit: int | None = None) -> list[tuple[int, int, int]] | None:
    """(src start, dst start, length) of the stretches where both id lists go up by one together; None once
    there are more than `limit` (scattered ids: the loop stops there rather than walk a long read's ids)."""
    runs: list[list[int]] = []
    for s, d in zip(src, dst):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        elif limit is not None and len(runs) == limit:
            return None
        else:
            runs.append([s, d, 1])
    return [tuple(r) for r in runs]


class IdStage:
    """A reader thread's pinned host buffer and device buffer for its reads' block ids, reused read after read: a
    fresh pinned tensor and device tensor per read were ~0.08 ms of the plan on the H200 (a 16-block read's plan
    0.135 -> 0.056 ms, 2026-12-03). A read waits for its copy before it returns, so the next read on the thread
    may overwrite both."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host = self.dev = torch.empty(0, dtype=torch.int64)

    def upload(self, src_ids: list[int], dst_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(src, dst) as int64 views of the device buffer, copied there on the current stream."""
        n_src, n = len(src_ids), len(src_ids) + len(dst_ids)
        if self.host.numel() < n:
            size = max(n, 2 * self.host.numel(), 1024)
            self.host = torch.empty(size, dtype=torch.int64, pin_memory=self.device.type == "cuda")
            self.dev = torch.empty(size, dtype=torch.int64, device=self.device)
        pack_int64_ids([*src_ids, *dst_ids], self.host)
        self.dev[:n].copy_(self.host[:n], non_blocking=True)
        return self.dev[:n_src], self.dev[n_src:n]


class BlockCopy:
    """dst[:, dst_ids] = src[:, src_ids] for every layer of one read, planned once: slices when the ids run
    together (one pass each), else with the two index tensors made once for all layers (a tensor built from a
    list per layer is a pageable host-to-device copy that waits: two per layer cost a 32-layer read ~3 ms on the
    H200, 2026-12-02): a gather then a scatter per layer here (the reference, and the path across devices or on
    CPU); on one GPU the connector launches the block-copy kernel over all the read's layers instead
    (IpcConnector._read, kernels/triton_block_copy.py: each byte moved once, one launch). stage: where a reader
    thread on one GPU uploads the ids (else each read allocates its own)."""

    def __init__(self, dst_ids: list[int], src_ids: list[int], dst_device: torch.device, src_device: torch.device,
                 stage: IdStage | None = None):
        self.runs = _runs(src_ids, dst_ids, MAX_SLICE_COPIES)
        self.src_index = self.dst_index = None
        if self.runs is None:
            if stage is not None and src_device == dst_device == stage.device:
                self.src_index, self.dst_index = stage.upload(src_ids, dst_ids)
            elif src_device == dst_device:  # one upload for both (each is a pinned buffer and a copy: ~70 us)
                both = to_device([*src_ids, *dst_ids], dst_device)
                self.src_index, self.dst_index = both[: len(src_ids)], both[len(src_ids) :]
            else:
                self.src_index, self.dst_index = to_device(src_ids, src_device), to_device(dst_ids, dst_device)

    def __call__(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if dst.dtype == torch.float8_e4m3fn:  # (CPU torch has no fp8 index ops: move the bytes)
            dst, src = dst.view(torch.uint8), src.view(torch.uint8)
        if self.runs is not None:
            for s, d, n in self.runs:
                dst[:, d : d + n].copy_(src[:, s : s + n], non_blocking=True)
            return
        gathered = src.index_select(1, self.src_index)
        dst.index_copy_(1, self.dst_index, gathered.to(dst.device, non_blocking=True))


class IpcConnector(StoreRendezvous, KVConnector):
    """KV blocks read one-sided from a producer's mapped pool on the same host (see the module docstring)."""

    name = "ipc"
    one_sided_read = True

    def __init__(self, config, kv_tensors):
        super().__init__(config, kv_tensors)
        self.device = kv_tensors[0].device
        share_pool(kv_tensors)
        self._export = export_pool(kv_tensors)  # (holds nothing: the engine keeps the pool alive)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._peers: dict[int, tuple[ProcessWatch, list[torch.Tensor]]] = {}  # kv rank -> (its process, its pool)
        self._reader = threading.local()  # per reader thread: its last plan and its IdStage (_block_copy)
        self._block_bytes = kv_tensors[0][:, 0].nbytes  # a block's K and V of one layer
        self._pointers: dict[int, tuple] = {}  # kv rank -> (its mapped pool, PoolPointers or None): see _kernel
        # the switches, read once (a read asks them every time)
        self._block_copy_kernel = self.device.type == "cuda" and os.environ.get("MESHSERVE_IPC_BLOCK_COPY", "1") != "0"
        self._graph_reads = self._block_copy_kernel and os.environ.get("MESHSERVE_IPC_READ_GRAPH", "1") != "0"

    @property
    def transport(self) -> str:
        cuda = self.device.type == "cuda"
        return "CUDA IPC one-sided read" if cuda else "shared-memory one-sided read (CPU)"

    def _connect(self) -> None:
        self._join_store()
        self._publish_address(msgspec.msgpack.encode(self._export), "ipc")
        self._wait_for_roles()
        if self.config.is_consumer:  # map now: a peer on another host is a start-up error, not a failed pull
            for rank in self._producer_ranks():
                if rank != self.rank:
                    self._peer(rank)

    def _thread_init(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _peer(self, rank: int) -> list[torch.Tensor]:
        peer = self._peers.get(rank)
        if peer is not None and peer[0].alive():
            return peer[1]
        if (gone := self._peers.pop(rank, None)) is not None:  # (exited: its restart publishes a new export)
            gone[0].close()
        export = msgspec.msgpack.decode(self._peer_value(rank, "ipc"), type=PoolExport)
        here = host_id()
        if export.host != here:
            raise KVTransferError(
                f"kv_transfer_config: the ipc connector maps the producer's memory, so both engines must "
                f"share a host: kv rank {rank} is on {export.host}, this one on {here} (across hosts: nixl, "
                f"torch)"
            )
        watch = ProcessWatch(export.pid)
        if not watch.alive():
            raise KVTransferError(f"ipc: kv rank {rank}'s process (pid {export.pid}) is gone")
        try:
            tensors = map_pool(export)
        except KVTransferError:
            watch.close()
            raise
        except Exception as e:  # (gone, or handles this platform cannot open)
            watch.close()
            raise KVTransferError(f"ipc: cannot map kv rank {rank}'s KV pool (pid {export.pid}): {e}") from e
        mine = self.kv_tensors
        if len(tensors) != len(mine) or any(
            (p.shape[0], *p.shape[2:]) != (m.shape[0], *m.shape[2:]) or p.dtype != m.dtype
            for p, m in zip(tensors, mine)
        ):
            watch.close()
            raise KVTransferError(
                f"kv rank {rank}'s KV blocks differ from this engine's ({len(tensors)} layers of "
                f"{tuple(tensors[0].shape)} {tensors[0].dtype}, here {len(mine)} of {tuple(mine[0].shape)} "
                f"{mine[0].dtype}): the two engines must run the same model, dtype and block size"
            )
        self._peers[rank] = (watch, tensors)
        logger.info(
            "KV transfer: kv rank %d's KV pool mapped (pid %d, %s)", rank, export.pid, tensors[0].device
        )
        return tensors

    def _read_blocks(self, src: int, remote_ids: list[int], block_ids: list[int], timeout_s: float) -> int:
        return self._read(src, remote_ids, block_ids, range(len(self.kv_tensors)))

    def _read_layer(
        self, src: int, layer: int, remote_ids: list[int], block_ids: list[int], timeout_s: float
    ) -> int:
        if not 0 <= layer < len(self.kv_tensors):
            raise KVTransferError(f"layer {layer} out of range ({len(self.kv_tensors)} layers)")
        return self._read(src, remote_ids, block_ids, range(layer, layer + 1))

    def _read(self, src: int, remote_ids: list[int], block_ids: list[int], layers) -> int:
        if len(remote_ids) != len(block_ids):
            raise KVTransferError(f"rank {src} holds {len(remote_ids)} blocks, {len(block_ids)} expected")
        remote = self._peer(src)
        t0 = time.perf_counter()
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            keep = len(layers) < len(self.kv_tensors)  # (a layer's read: the next layers read the same ids)
            graphs = None if keep else self._graphs(src, remote)
            if graphs is not None:  # a whole read: the ids' upload and the copy replayed from a graph
                try:
                    graphs(block_ids, remote_ids)
                except IndexError as e:  # (the ids checked as packed)
                    raise KVTransferError(f"kv rank {src}: {e}") from None
                except RuntimeError as e:  # a capture this platform refuses: launched reads from now on
                    logger.warning("KV transfer: ipc reads cannot replay CUDA graphs here (%s); launching them", e)
                    self._graph_reads = False
                else:
                    return self._wait(src, remote, len(block_ids) * len(layers), t0)
            num_blocks = remote[0].shape[1]
            if remote_ids and (min(remote_ids) < 0 or max(remote_ids) >= num_blocks):
                raise KVTransferError(
                    f"block id out of range (kv rank {src}'s pool of {num_blocks} blocks): {remote_ids}"
                )
            copy = self._block_copy(src, block_ids, remote_ids, remote[0].device, keep)
            pointers = self._kernel(src, remote) if copy.runs is None else None
            if pointers is not None:  # every layer of the read in one launch
                from meshserve.kernels.triton_block_copy import copy_blocks

                copy_blocks(pointers, copy.dst_index, copy.src_index, layers)
            else:
                for layer in layers:
                    copy(self.kv_tensors[layer], remote[layer])
        return self._wait(src, remote, len(block_ids) * len(layers), t0)

    def _wait(self, src: int, remote: list[torch.Tensor], block_layers: int, t0: float) -> int:
        """Waits for a read's copy; its bytes."""
        nbytes = self._block_bytes * block_layers
        if self._stream is not None:
            if remote[0].device != self.device:  # (a gather on the peer GPU runs on that device's stream)
                torch.cuda.current_stream(remote[0].device).synchronize()
            self._stream.synchronize()  # the blocks are whole before the core may schedule them
        seconds = time.perf_counter() - t0
        logger.debug("KV transfer: %d bytes read from kv rank %d in %.4f s", nbytes, src, seconds)
        return nbytes

    def _kernel(self, src: int, remote: list[torch.Tensor]):
        """The block-copy kernel's pointer tables from kv rank src's pool into ours (made once per mapping), or None
        where the kernel does not apply: not on a GPU, pools it cannot take (another device: the gather path
        runs the copy across), or MESHSERVE_IPC_BLOCK_COPY=0 (the gather, for A/Bs)."""
        if not self._block_copy_kernel:
            return None
        from meshserve.kernels import triton_block_copy  # (Triton only where a GPU reads)

        peer = self._pointers.get(src)
        if peer is None or peer[0] is not remote:
            mine = self.kv_tensors
            ok = all(triton_block_copy.fits(m, r) for m, r in zip(mine, remote))
            peer = (remote, triton_block_copy.PoolPointers.of(mine, remote) if ok else None)
            self._pointers[src] = peer
        return peer[1]

    def _graphs(self, src: int, remote: list[torch.Tensor]):
        """The reader thread's BlockCopyGraphs from kv rank src's pool (kernels/block_copy_graph.py), or None where
        the kernel does not apply (_kernel), a capture failed, or MESHSERVE_IPC_READ_GRAPH=0 (launched reads,
        for A/Bs)."""
        if not self._graph_reads:
            return None
        pointers = self._kernel(src, remote)
        if pointers is None:
            return None
        reader = self._reader
        if not hasattr(reader, "graphs"):
            reader.graphs = {}
        graphs = reader.graphs.get(src)
        if graphs is None or graphs.pointers is not pointers:  # (a remapped producer: new pointer tables)
            from meshserve.kernels.block_copy_graph import BlockCopyGraphs

            graphs = reader.graphs[src] = BlockCopyGraphs(pointers, self.device, remote[0].shape[1])
        return graphs

    def _block_copy(self, src: int, block_ids: list[int], remote_ids: list[int], remote_device,
                    keep: bool = True) -> BlockCopy:
        """The read's copy plan; with keep, kept for the thread's next read of the same blocks (a layer-by-layer
        transfer reads the same ids once per layer; a whole request's read is not repeated, so it builds no key
        of its ids); per thread, as the plan's index tensors are views of the thread's IdStage, which its next
        plan overwrites."""
        reader = self._reader
        if not hasattr(reader, "stage"):
            reader.last = None
            reader.stage = IdStage(self.device) if self.device.type == "cuda" else None
        if not keep:
            reader.last = None  # (its indices are overwritten with the stage)
            return BlockCopy(block_ids, remote_ids, self.device, remote_device, reader.stage)
        key = (src, tuple(block_ids), tuple(remote_ids))
        if reader.last is None or reader.last[0] != key:
            reader.last = (key, BlockCopy(block_ids, remote_ids, self.device, remote_device, reader.stage))
        return reader.last[1]

    def close(self) -> None:
        super().close()  # (the threads are done with the mappings)
        for watch, _ in self._peers.values():
            watch.close()
        self._peers.clear()  # unmaps (the producer's memory stays its own)
