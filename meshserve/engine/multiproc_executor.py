"""The multiprocess executor: rank 0 of a torch.distributed world, driving the other ranks' runners.

Each step it broadcasts the typed SchedulerOutput over a gloo group, runs its own shard, and receives the
sampled tokens from the sampler rank (TP rank 0 of the last pipeline stage). A worker that dies or hangs
ends the engine with an error naming the rank, within the collective timeout.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import time

import torch.distributed as dist

from meshserve.config import EngineConfig
from meshserve.distributed.launch import HEARTBEAT_S, LaunchInfo
from meshserve.distributed.parallel_state import destroy_parallel_state, get_parallel_state
from meshserve.engine.worker import init_rank, worker_main
from meshserve.errors import EngineDeadError

logger = logging.getLogger(__name__)


class MultiprocExecutor:
    """Rank 0 of tp x pp ranks, with its own ModelRunner; spawns this node's other ranks as worker processes.

    Holds the worker processes and their heartbeats. Promises: every call runs on every rank in the same
    order; a worker that dies or hangs ends the engine with an EngineDeadError naming the rank.
    """

    # sampled ids come back through a collective each step; nothing can be queued behind them
    supports_async_scheduling = False

    def __init__(self, config: EngineConfig, source, launch: LaunchInfo):
        self.launch = launch
        self.workers: dict[int, mp.Process] = {}
        self._mid_protocol = False
        self._start_workers(config, source, launch, worker_main)
        atexit.register(self.shutdown)
        try:
            self.runner = init_rank(config, source, launch, 0)
        except Exception:
            self.shutdown()
            raise
        self.state = self.runner_state()

    def _start_workers(self, config, source, launch, worker_main) -> None:
        ctx = mp.get_context("spawn")
        # last heartbeat (time.monotonic, shared clock on one host) of each local rank
        self.beats = ctx.Array("d", launch.world_size, lock=False)
        for rank in launch.local_ranks():
            if rank == 0:
                continue
            p = ctx.Process(target=worker_main, args=(config, source, launch, rank, self.beats), daemon=True,
                            name=f"meshserve-rank{rank}")
            p.start()
            self.workers[rank] = p

    def _exit_codes(self) -> dict[int, int | None]:
        """rank -> exit code of each worker (None while running)."""
        return {rank: p.exitcode for rank, p in self.workers.items()}

    def _stop_workers(self) -> None:
        if self._mid_protocol:
            for p in self.workers.values():
                p.kill()
        for p in self.workers.values():
            p.join(timeout=5)
        for p in self.workers.values():
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    @staticmethod
    def runner_state():
        return get_parallel_state()

    def _check_workers(self) -> None:
        for rank, code in self._exit_codes().items():
            if code is not None:
                raise EngineDeadError(f"worker rank {rank} exited with code {code}")

    def _fail(self, error: BaseException) -> EngineDeadError:
        # a peer's death shows up as a broken connection a moment before its exit code does
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                self._check_workers()
            except EngineDeadError as dead:
                self.shutdown()
                return dead
            time.sleep(0.05)
        silent = self._silent_ranks()
        self.shutdown()
        if silent:
            return EngineDeadError(f"worker rank {', '.join(map(str, silent))} stopped responding "
                                   f"(no heartbeat for over {2 * HEARTBEAT_S:.0f} s); the group was stopped")
        return EngineDeadError(f"distributed step failed (a rank hung or died): {str(error).splitlines()[0]}")

    def _silent_ranks(self) -> list[int]:
        """Local worker ranks whose heartbeat went stale (stopped or wedged processes)."""
        beats = getattr(self, "beats", None)
        if beats is None:
            return []
        now = time.monotonic()
        return [rank for rank in self.workers if now - beats[rank] > 2 * HEARTBEAT_S]

    def collective_rpc(self, method: str, *args):
        """Every rank calls runner.method(*args); returns rank 0's result."""
        self._check_workers()
        self._mid_protocol = True  # stays set if an exception (or Ctrl-C / SIGTERM) cuts the exchange short
        try:
            dist.broadcast_object_list([(method, args)], src=0, group=self.state.cpu_group)
            result = getattr(self.runner, method)(*args)
        except Exception as e:
            raise self._fail(e) from e
        if method != "execute" or self.state.sampler_rank == 0:
            self._mid_protocol = False
        return result

    def gather_rpc(self, method: str, *args) -> list:
        """Every rank calls runner.method(*args); returns all results, indexed by rank."""
        self._check_workers()
        self._mid_protocol = True
        try:
            dist.broadcast_object_list([("gather:" + method, args)], src=0, group=self.state.cpu_group)
            results = [None] * self.state.world_size
            dist.gather_object(getattr(self.runner, method)(*args), results, dst=0, group=self.state.cpu_group)
        except Exception as e:
            raise self._fail(e) from e
        self._mid_protocol = False
        return results

    def execute(self, sched_out):
        out = self.collective_rpc("execute", sched_out)
        sampler = self.state.sampler_rank
        if sampler != 0:
            try:
                box = [None]
                dist.recv_object_list(box, src=sampler, group=self.state.cpu_group)
                out = box[0]
            except Exception as e:
                raise self._fail(e) from e
            self._mid_protocol = False
        return out

    def shutdown(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            # a graceful goodbye only from a clean point of the protocol; otherwise the ranks are killed
            if (dist.is_initialized() and not self._mid_protocol
                    and all(c is None for c in self._exit_codes().values())):
                dist.broadcast_object_list([("shutdown", ())], src=0, group=self.state.cpu_group)
        except Exception:  # noqa: BLE001, S110  (peers may already be gone)
            pass
        self._stop_workers()
        destroy_parallel_state()
