"""DPCoreClient: one EngineCoreClient over N data-parallel engine cores, each in its own process (vLLM's
single-node DP: no HTTP hop, no router process in the middle).

`meshserve serve --data-parallel-size N` starts N core processes, each on its own TP x PP slice of the GPUs
(CUDA_VISIBLE_DEVICES), and every API process holds one ZeroMQ client per core behind this class:
- add_request sends each request to the live core with the fewest outstanding sequences (the larger of what
  this front end has sent it and not seen finish, and what the core last said it holds from every front end;
  ties rotate), and remembers which core has it;
- abort_requests goes to the core that holds each id (client gone, stop string hit);
- get_outputs polls every core's socket at once and hands back one core's step at a time, its stats replaced
  by the merged stats of all cores (dp_stats.py): /metrics shows the server's sums, and the admission check
  predicts the TTFT of the core the next request goes to, so a 429 means even the least loaded core is past
  the target. A refusal from a core is final: it is not retried on another one (the front end's check
  already chose the best core; a core refusing means the prediction was stale, and a retry would land late).
A core that dies fails its own requests at once (EngineDeadError each, nothing hangs) while the others finish
theirs; from then on is_alive() is False, so /health answers 503, new requests are refused and whatever
supervises the server restarts it. get_outputs raises EngineDeadError once every core is gone.
Not done: prefix-cache affinity (a shared prefix may land on either core and be computed twice).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable

import msgspec
import zmq

from meshserve.config import EngineArgs
from meshserve.engine.core_client import IDLE_POLL_S
from meshserve.engine.core_process import CoreProcess, ProcessCoreClient, ZmqCoreClient
from meshserve.engine.dp_stats import load_of, merge_stats
from meshserve.engine.messages import EngineCoreOutputs, EngineCoreRequest, RequestError, SchedulerStats
from meshserve.errors import EngineDeadError

logger = logging.getLogger(__name__)


def spawn_dp_cores(
    args: EngineArgs, num_cores: int, core_factory: Callable | None = None, startup_timeout_s: float = 1800.0
) -> list[CoreProcess]:
    """Spawn num_cores engine-core processes, each on its own GPU slice; returns without waiting for the model
    loads (they overlap each other and the caller's imports). On failure the ones started are killed."""
    devices = core_devices(args, num_cores)
    cores: list[CoreProcess] = []
    try:
        for i, dev in enumerate(devices):
            env = {"CUDA_VISIBLE_DEVICES": dev} if dev is not None else None
            core_args = _core_args(args, i) if num_cores > 1 else args
            cores.append(CoreProcess(core_args, startup_timeout_s, core_factory, wait=False, env=env))
    except BaseException:
        for c in cores:
            c.kill()
        raise
    return cores


def core_devices(args: EngineArgs, num_cores: int) -> list[str | None]:
    """Each core's CUDA_VISIBLE_DEVICES (None: this process's). One core keeps this process's GPUs: counting
    them imports torch and reads the devices in this process (the server's, before the core can start: 4 s of
    the start-up on an H200 with 4 API processes), for nothing to split."""
    if num_cores == 1:
        return [None]
    from meshserve.distributed.data_parallel import replica_devices

    return replica_devices(num_cores, args.tensor_parallel_size, args.pipeline_parallel_size, args.device)


def _core_args(args: EngineArgs, index: int) -> EngineArgs:
    """Core index's own copy of what cores must not share: rendezvous port, step trace, disk KV tier."""
    changes: dict = {"master_port": None}  # each core's TP/PP ranks meet on a free port of their own
    if args.step_trace:
        stem, ext = os.path.splitext(args.step_trace)
        changes["step_trace"] = f"{stem}.dp{index}{ext}"
    if args.kv_offloading_disk_path:
        changes["kv_offloading_disk_path"] = os.path.join(args.kv_offloading_disk_path, f"dp{index}")
    return dataclasses.replace(args, **changes)


class DPCoreClient:
    """An EngineCoreClient that balances requests over several cores (see the module doc)."""

    def __init__(self, clients: list[ZmqCoreClient]):
        if not clients:
            raise ValueError("DPCoreClient needs at least one core")
        self.clients = clients
        # requests must fit any core: the smallest KV cache bounds what is accepted
        self.info = msgspec.structs.replace(
            clients[0].info, num_blocks=min(c.info.num_blocks for c in clients)
        )
        n = len(clients)
        self._lock = threading.Lock()  # the maps below, between callers' threads and the output thread
        self._core_of: dict[str, int] = {}  # request id -> the core that holds it
        self._outstanding = [0] * n  # requests sent to each core and not yet finished, refused or aborted
        self.num_requests = [0] * n  # requests sent to each core since start
        self._stats = [SchedulerStats(num_blocks=c.info.num_blocks) for c in clients]
        self._expert_load: list[list[list[int]]] = [[] for _ in clients]
        self._alive = [True] * n
        self._rotate = 0
        self._recv_lock = threading.Lock()  # held while polling; shutdown takes it before closing sockets
        self._poller = zmq.Poller()
        self._socket_index = {}
        for i, c in enumerate(clients):
            self._poller.register(c.outputs_socket, zmq.POLLIN)
            self._socket_index[c.outputs_socket] = i
        self._ready: collections.deque[int] = collections.deque()  # cores with a message waiting
        self._next_liveness_check = 0.0
        self._closed = False

    @classmethod
    def from_core_processes(cls, args: EngineArgs, cores: list[CoreProcess]) -> DPCoreClient:
        """Own already spawned cores: wait for each model, connect; any failure stops them all."""
        clients: list[ProcessCoreClient] = []
        try:
            for core in cores:
                clients.append(ProcessCoreClient(args, core_process=core))
            return cls(clients)
        except BaseException:
            for c in clients:
                c.shutdown()
            for core in cores[len(clients) :]:
                core.kill()
            raise

    @property
    def num_cores(self) -> int:
        return len(self.clients)

    def per_core_stats(self) -> list[SchedulerStats]:
        """Each core's counters as of its last message (/metrics labels them by engine)."""
        return list(self._stats)

    # -- routing ---------------------------------------------------------------------------------
    def _pick(self) -> int | None:
        """The live core with the fewest outstanding sequences; ties go round the cores in turn."""
        n = len(self.clients)
        best, best_key = None, None
        for j in range(n):
            i = (self._rotate + j) % n
            if not self._alive[i]:
                continue
            key = max(self._outstanding[i], load_of(self._stats[i]))
            if best_key is None or key < best_key:
                best, best_key = i, key
        self._rotate = (self._rotate + 1) % n
        return best

    def _merged_stats(self) -> SchedulerStats:
        target = None
        live = [i for i in range(len(self.clients)) if self._alive[i]]
        if live:  # the prediction of the core a new request would go to: the least loaded one
            target = min(
                live,
                key=lambda i: (
                    max(self._outstanding[i], load_of(self._stats[i])),
                    self._stats[i].queue_wait_s,
                ),
            )
        return merge_stats(self._stats, target, self._expert_load)

    # -- commands --------------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> None:
        with self._lock:
            i = self._pick()
            if i is None or self._closed:
                raise EngineDeadError("the engine is not running")
            self._core_of[request.request_id] = i
            self._outstanding[i] += 1
            self.num_requests[i] += 1
        try:
            self.clients[i].add_request(request)
        except BaseException:
            with self._lock:
                if self._core_of.pop(request.request_id, None) is not None:
                    self._outstanding[i] -= 1
            raise

    def abort_requests(self, request_ids: list[str]) -> None:
        by_core: dict[int, list[str]] = {}
        with self._lock:
            for rid in request_ids:
                i = self._core_of.pop(rid, None)
                if i is not None:
                    self._outstanding[i] -= 1
                    by_core.setdefault(i, []).append(rid)
        for i, ids in by_core.items():
            self.clients[i].abort_requests(ids)

    # -- outputs ---------------------------------------------------------------------------------
    def get_outputs(self, timeout: float | None = None) -> EngineCoreOutputs | None:
        with self._recv_lock:
            return self._get_outputs(timeout)

    def _get_outputs(self, timeout: float | None) -> EngineCoreOutputs | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise EngineDeadError("the engine was shut down")
            now = time.monotonic()
            if now >= self._next_liveness_check:  # also while busy: a core that dies mid-step never answers
                self._next_liveness_check = now + IDLE_POLL_S
                for i, c in enumerate(self.clients):
                    if self._alive[i] and not c.is_alive():
                        return self._core_died(i, EngineDeadError(f"engine core {i} is gone"))
            if not self._ready:
                wait = IDLE_POLL_S if deadline is None else max(0.0, min(IDLE_POLL_S, deadline - now))
                events = self._poller.poll(int(1000 * wait))
                self._ready.extend(
                    self._socket_index[sock] for sock, _ in events if self._alive[self._socket_index[sock]]
                )
            if self._ready:
                i = self._ready.popleft()
                try:
                    out = self.clients[i].get_outputs(timeout=0)
                except EngineDeadError as e:
                    return self._core_died(i, e)
                if out is not None:
                    return self._account(i, out)
            elif deadline is not None and time.monotonic() >= deadline:
                return None

    def _account(self, i: int, out: EngineCoreOutputs) -> EngineCoreOutputs:
        """Forget what finished or was refused, keep the core's counters, hand on the merged ones."""
        out.engine_index = i  # its sequences' per-request series are labelled with their core (/metrics)
        with self._lock:
            for o in out.outputs:
                if o.finish_reason is not None and self._core_of.pop(o.request_id, None) is not None:
                    self._outstanding[i] -= 1
            for err in out.errors:
                if self._core_of.pop(err.request_id, None) is not None:
                    self._outstanding[i] -= 1
            if out.stats is not None:
                self._stats[i] = out.stats
                if out.stats.expert_load:
                    self._expert_load[i] = out.stats.expert_load
                out.stats = self._merged_stats()
        return out

    def _core_died(self, i: int, error: BaseException) -> EngineCoreOutputs:
        """Fail the dead core's requests (the others run on); raise once no core is left."""
        self._poller.unregister(self.clients[i].outputs_socket)  # its last messages would wake every poll
        with self._lock:
            self._alive[i] = False
            lost = [rid for rid, core in self._core_of.items() if core == i]
            for rid in lost:
                del self._core_of[rid]
            self._outstanding[i] = 0
            stats = self._merged_stats()
        logger.error("data-parallel engine core %d died (%s); failing its %d request(s)", i, error, len(lost))
        if not any(self._alive):
            raise EngineDeadError(f"every engine core is gone (the last: {error})")
        errors = [RequestError(rid, "EngineDeadError", f"engine core {i} died: {error}") for rid in lost]
        return EngineCoreOutputs([], errors, stats, time.monotonic())

    def is_alive(self) -> bool:
        """All cores up (one lost: the server is unhealthy, though the others finish what they hold)."""
        return not self._closed and all(self._alive) and all(c.is_alive() for c in self.clients)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop (owned cores) or let go of (shared cores) every core."""
        self._closed = True
        with self._recv_lock:  # the output thread is out of poll() and sees _closed next
            stops = [threading.Thread(target=c.shutdown, args=(timeout,)) for c in self.clients]
            for t in stops:  # all at once: each core drains and exits in parallel
                t.start()
            for t in stops:
                t.join()
