"""The multiprocess executor: rank 0 of a torch.distributed world, driving the other ranks' runners.

Each step it broadcasts the typed SchedulerOutput over a gloo group, runs its own shard, and receives the
sampled tokens from the sampler rank (TP rank 0 of the last pipeline stage). A worker that dies or hangs
ends the engine with an error naming the rank, within the collective timeout; one that dies while starting
(importing, joining the world, loading), at once.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import queue
import threading
import time

import torch.distributed as dist

from meshserve.config import EngineConfig
from meshserve.distributed import process_start
from meshserve.distributed.call_liveness import CallKeepalive
from meshserve.distributed.launch import HEARTBEAT_S, LaunchInfo
from meshserve.distributed.object_channel import ObjectChannel
from meshserve.distributed.parallel_state import destroy_parallel_state, get_parallel_state
from meshserve.engine.runner_output import PendingOutput
from meshserve.engine.step_delta import StepDeltaSender
from meshserve.engine.worker import init_rank, worker_process_main
from meshserve.errors import EngineDeadError, MeshserveError
from meshserve.models.config_snapshot import without_transformers
from meshserve.models.loader import with_checkpoint_shapes

logger = logging.getLogger(__name__)

# how long a spawned rank may take to reach the rendezvous (imports, device set-up) on a busy machine
STARTUP_TIMEOUT_S = 300.0


class MultiprocExecutor:
    """Rank 0 of tp x pp ranks, with its own ModelRunner; spawns this node's other ranks as worker processes.

    Holds the worker processes and their heartbeats. Promises: every call runs on every rank in the same
    order; a worker that dies or hangs ends the engine with an EngineDeadError naming the rank.
    """

    def __init__(self, config: EngineConfig, source, launch: LaunchInfo):
        self.launch = launch
        # with one pipeline stage rank 0 samples, so its step can be queued and read back later (the
        # other TP ranks get the sampled ids from it on the device); a later stage's tokens come back
        # through a host collective each step, and nothing can be queued behind them
        self.supports_async_scheduling = launch.pp_size == 1
        # and for the same reason its step's grammar masks can be filled late, here, once rank 0's forward is
        # queued (EngineCore._late_masks_hook): they never go to the workers, which do not sample
        self.late_grammar_masks = launch.pp_size == 1
        # pipeline parallel: the engine keeps pipeline_depth steps in flight (EngineCore._step_pipelined,
        # engine/pipeline_stage.py); the last stage's tokens come back through a receiving thread, in step order
        self.pipeline_depth = config.parallel_config.pipeline_steps_in_flight if launch.pp_size > 1 else 0
        self._results: queue.Queue | None = None
        # a step's params and block tables less what the workers hold (and the masks, unless a worker samples)
        self._delta = StepDeltaSender(workers_sample=launch.pp_size > 1)
        self._calls: ObjectChannel | None = None  # calls to every rank, once the group is up
        self._keepalive = CallKeepalive(launch.timeout_s)  # no-op calls while idle (distributed/call_liveness.py)
        self.workers: dict[int, mp.Process] = {}
        self._mid_protocol = True  # until every rank is up: a rank still joining is killed, not waited for
        self._joining: threading.Thread | None = None  # rank 0's join, if a death left it blocked
        # dummy weights: their names and shapes once, here, not in each rank (importing transformers' modeling
        # code for them cost each rank ~1.5 s of a quiet 2-core machine, ~5 s of a loaded one)
        source = with_checkpoint_shapes(source)
        self._start_workers(config, source, launch, worker_process_main)
        atexit.register(self.shutdown)
        try:
            self._wait_for_rendezvous()
            self.runner = init_rank(config, source, launch, 0, run_join=self._join_watched)
        except Exception as e:
            # a peer that died while loading breaks rank 0's collectives: name it rather than the symptom
            dead = None if isinstance(e, MeshserveError) else self._dead_worker(" during start-up")
            self.shutdown()
            if dead is not None:
                raise dead from e
            raise
        self._mid_protocol = False
        self.state = self.runner_state()

    def _start_workers(self, config, source, launch, worker_main) -> None:
        ctx = process_start.context()
        # last heartbeat (time.monotonic, shared clock on one host) of each local rank
        self.beats = ctx.Array("d", launch.world_size, lock=False)
        # the ranks read the model's config fields only: as plain values they unpickle without transformers
        config, source = without_transformers(config), without_transformers(source)
        for rank in launch.local_ranks():
            if rank == 0:
                continue
            p = process_start.new_process(worker_main, (config, source, launch, rank, self.beats), daemon=True,
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

    def _check_workers(self, when: str = "") -> None:
        for rank, code in self._exit_codes().items():
            if code is not None:
                pid = f" (pid {self.workers[rank].pid})" if rank in self.workers else ""
                raise EngineDeadError(f"worker rank {rank}{pid} exited with code {code}{when}")

    def _wait_for_rendezvous(self) -> None:
        """Wait for every local worker's first heartbeat (sent just before it joins the world), naming at once
        one that exits first: the rendezvous itself would only time out, naming no rank. A rank may take
        long to import on a busy machine, so the wait is generous; it ends early only on a death."""
        beats = getattr(self, "beats", None)
        if beats is None:  # ranks that are not this node's processes (Ray actors)
            return
        limit = max(self.launch.timeout_s, STARTUP_TIMEOUT_S)
        deadline = time.monotonic() + limit
        while missing := [rank for rank in self.workers if not beats[rank]]:
            self._check_workers(" during start-up")
            if time.monotonic() > deadline:
                raise EngineDeadError(f"worker rank {', '.join(map(str, missing))} did not reach the "
                                      f"rendezvous within {limit:.0f} s")
            time.sleep(0.05)

    def _join_watched(self, join) -> None:
        """Run rank 0's joining in a thread while watching the workers: a rank that dies inside the
        rendezvous leaves it waiting, in C++, for the whole timeout. On a death the thread is left behind
        (it ends at the timeout, its error dropped) and the error names the rank at once."""
        outcome: list[BaseException | None] = []

        def run():
            try:
                join()
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001  (handed to the waiting thread, or dropped)
                outcome.append(e)

        thread = threading.Thread(target=run, name="meshserve-join", daemon=True)
        thread.start()
        while thread.is_alive():
            try:
                self._check_workers(" during start-up")
            except EngineDeadError:
                self._joining = thread  # shutdown must not tear the group down under it
                raise
            thread.join(0.05)
        error = outcome[0]
        if isinstance(error, dist.DistError):  # e.g. a rank on another node never came: one line, no trace
            raise EngineDeadError(f"joining the {self.launch.world_size} ranks failed: "
                                  f"{str(error).splitlines()[0]}") from error
        if error is not None:
            raise error

    def _dead_worker(self, when: str = "", grace_s: float = 2.0) -> EngineDeadError | None:
        """The error naming a worker that exited, waiting up to grace_s for one (a peer's death shows up
        as a broken connection a moment before its exit code does); None if all still run."""
        deadline = time.monotonic() + grace_s
        while True:
            try:
                self._check_workers(when)
            except EngineDeadError as dead:
                return dead
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _fail(self, error: BaseException) -> EngineDeadError:
        dead = self._dead_worker()
        if dead is not None:
            self.shutdown()
            return dead
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
            self._broadcast(method, args)
            result = getattr(self.runner, method)(*args)
        except Exception as e:
            raise self._fail(e) from e
        if method != "execute" or self.state.sampler_rank == 0:
            self._mid_protocol = False
        return result

    def _broadcast(self, method: str, args: tuple) -> None:
        """Send a call to every rank (one gloo operation: object_channel.py); a step goes without what the
        workers hold of it (step_delta.py)."""
        if self._calls is None:
            self._calls = ObjectChannel(self.state.call_group)
        if method != "execute":
            self._keepalive.send(self._calls.broadcast, (method, args), last=method == "shutdown")
            return
        with self._delta.stripped(args[0]):
            self._keepalive.send(self._calls.broadcast, (method, args))

    def gather_rpc(self, method: str, *args) -> list:
        """Every rank calls runner.method(*args); returns all results, indexed by rank."""
        self._check_workers()
        self._mid_protocol = True
        try:
            self._broadcast("gather:" + method, args)
            results = [None] * self.state.world_size
            dist.gather_object(getattr(self.runner, method)(*args), results, dst=0, group=self.state.cpu_group)
        except Exception as e:
            raise self._fail(e) from e
        self._mid_protocol = False
        return results

    def execute_async(self, sched_out) -> PendingOutput | StageResult:
        """Send the step to every rank and run rank 0's part. With one stage, result() waits for rank 0's
        own sampled ids; with several, for the last stage's, which arrive in step order."""
        self._check_workers()
        self._mid_protocol = True
        try:
            self._broadcast("execute", (sched_out,))
            pending = self.runner.launch(sched_out)
        except Exception as e:
            raise self._fail(e) from e
        self._mid_protocol = False
        if self.state.sampler_rank == 0:
            return pending
        self._start_receiving()
        return StageResult(self)

    def execute(self, sched_out):
        out = self.collective_rpc("execute", sched_out)
        if self.state.sampler_rank != 0:
            self._start_receiving()
            out = StageResult(self).result()
            self._mid_protocol = False
        return out

    def _start_receiving(self) -> None:
        """The thread that receives the last stage's step results (one per step, in order) into a queue, so
        the sampler rank never waits on rank 0 while rank 0 broadcasts the next steps."""
        if self._results is not None:
            return
        self._results = results = queue.Queue()
        src, channel = self.state.sampler_rank, ObjectChannel(self.state.token_group or self.state.cpu_group)

        def receive():
            while True:
                try:
                    item = channel.recv(src)
                except Exception as e:  # noqa: BLE001  (handed to the reader: a dead rank or shutdown)
                    results.put(e)
                    return
                results.put(item)

        threading.Thread(target=receive, name="meshserve-stage-results", daemon=True).start()

    def next_stage_result(self):
        """The next step's result from the last stage, watching the workers while waiting."""
        deadline = time.monotonic() + self.launch.timeout_s
        while True:
            try:
                item = self._results.get(timeout=1.0)
                break
            except queue.Empty:
                try:
                    self._check_workers()
                    if time.monotonic() > deadline:
                        raise EngineDeadError(f"the last pipeline stage sent no result within "
                                              f"{self.launch.timeout_s:.0f} s")
                except EngineDeadError as dead:
                    self.shutdown()
                    raise dead from None
        if isinstance(item, BaseException):
            raise self._fail(item) from item
        return item

    def shutdown(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            # a graceful goodbye only from a clean point of the protocol; otherwise the ranks are killed
            if (dist.is_initialized() and not self._mid_protocol
                    and all(c is None for c in self._exit_codes().values())):
                self.runner.drain_handoff()
                self._broadcast("shutdown", ())
        except Exception:  # noqa: BLE001, S110  (peers may already be gone)
            pass
        self._keepalive.stop()
        self._stop_workers()
        runner = getattr(self, "runner", None)
        if runner is not None:
            try:
                runner.close()
            except Exception:  # noqa: BLE001, S110  (a broken device or group: teardown below is bounded)
                pass
        if self._joining is None or not self._joining.is_alive():
            destroy_parallel_state()


class StageResult:
    """A step whose tokens the last pipeline stage sends back; result() waits for them (once)."""

    def __init__(self, executor: MultiprocExecutor):
        self._executor = executor
        self._output = None

    def result(self):
        if self._output is None:
            self._output = self._executor.next_stage_result()
        return self._output
