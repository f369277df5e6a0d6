"""Where this process sits in a multi-process, possibly multi-node, launch.

Three ways in: (1) one command on one node spawns every rank; (2) `--nnodes N --node-rank r
--master-addr A --master-port P` on each node spawns that node's ranks; (3) a torchrun-style environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), as set by torchrun, Kubernetes LeaderWorkerSet or
Slurm wrappers, makes this process exactly one rank. Rank 0 always runs the scheduler.

Also the lifecycle of a spawned rank process: it dies with its parent, and stamps a heartbeat the driver
watches to name a rank that stopped answering.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

from meshserve.config import ParallelConfig
from meshserve.errors import InvalidArgumentError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LaunchInfo:
    """The resolved launch: world shape, rendezvous address, backend, and which rank(s) this process runs."""

    tp_size: int
    pp_size: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    backend: str  # nccl on GPU, gloo on CPU
    timeout_s: float
    rank: int  # this process's rank (the node's first rank when it spawns the rest)
    torchrun: bool = False
    pp_layer_partition: list[int] | None = None

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    def local_ranks(self) -> list[int]:
        """Ranks this process must run or spawn."""
        if self.torchrun:
            return [self.rank]
        first = self.node_rank * self.ranks_per_node
        return list(range(first, first + self.ranks_per_node))

    def local_index(self, rank: int) -> int:
        """The GPU index of a rank on its node."""
        if self.torchrun:
            return int(os.environ.get("LOCAL_RANK", rank % self.ranks_per_node))
        return rank % self.ranks_per_node


def launch_info(pc: ParallelConfig, device: str = "cpu") -> LaunchInfo:
    world = pc.world_size
    backend = "nccl" if device.startswith("cuda") else "gloo"
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        if int(env["WORLD_SIZE"]) != world:
            raise InvalidArgumentError(
                f"WORLD_SIZE={env['WORLD_SIZE']} but tensor_parallel_size x pipeline_parallel_size = {world}")
        return LaunchInfo(pc.tensor_parallel_size, pc.pipeline_parallel_size, pc.nnodes, pc.node_rank,
                          env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), backend,
                          pc.distributed_timeout_s, rank=int(env["RANK"]), torchrun=True,
                          pp_layer_partition=pc.pp_layer_partition)
    if world % pc.nnodes:
        raise InvalidArgumentError(f"{world} ranks do not split evenly over {pc.nnodes} nodes", param="nnodes")
    port = pc.master_port or (free_port() if pc.nnodes == 1 else 29500)
    return LaunchInfo(pc.tensor_parallel_size, pc.pipeline_parallel_size, pc.nnodes, pc.node_rank,
                      pc.master_addr, port, backend, pc.distributed_timeout_s,
                      rank=pc.node_rank * (world // pc.nnodes), pp_layer_partition=pc.pp_layer_partition)


def spawns_local_ranks(args) -> bool:
    """Whether rank 0 of these EngineArgs starts worker processes on its node (launch_info's layout: not under
    torchrun, more than one rank per node, the multiprocess backend)."""
    world = args.tensor_parallel_size * args.pipeline_parallel_size
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    return args.distributed_executor_backend == "mp" and not torchrun and world // max(1, args.nnodes) > 1


def die_with_parent() -> None:
    """Linux: have the kernel kill this process if the process that spawned it dies (no orphan ranks)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class StopSignal:
    """A signal handler that only records the signal (SIGTERM / SIGINT) for a supervising loop to act on."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, sig: int, frame) -> None:
        self.signal = sig


def stop_processes(procs: list, timeout_s: float) -> None:
    """SIGTERM each live process (it drains its work), wait up to timeout_s in all, then SIGKILL the rest."""
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)


HEARTBEAT_S = 0.5


def start_heartbeat(beats, rank: int) -> None:
    """Stamp beats[rank] twice a second, so the driver can name a rank that stopped answering (a rank that
    is stopped or wedged in Python stops stamping; a live one blocked in a collective keeps going)."""
    def beat():
        while True:
            beats[rank] = time.monotonic()
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=beat, name="meshserve-heartbeat", daemon=True).start()
