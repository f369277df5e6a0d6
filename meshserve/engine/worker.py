"""A worker rank: joins the group, builds its model shard, then executes what rank 0 broadcasts."""

from __future__ import annotations

import copy
import faulthandler
import functools
import logging
import multiprocessing.util
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from meshserve.config import EngineConfig
from meshserve.distributed import process_start
from meshserve.distributed.call_liveness import NOOP, SilenceWatchdog, silence_limit_s
from meshserve.distributed.launch import LaunchInfo, die_with_parent, start_heartbeat
from meshserve.distributed.object_channel import ObjectChannel
from meshserve.distributed.parallel_state import (
    destroy_parallel_state,
    get_parallel_state,
    init_parallel_state,
)
from meshserve.engine import startup_timeline
from meshserve.engine.model_runner import ModelRunner
from meshserve.engine.step_delta import StepDeltaReceiver
from meshserve.models.config_snapshot import without_transformers
from meshserve.models.loader import with_checkpoint_shapes

logger = logging.getLogger(__name__)


def init_rank(config: EngineConfig, source, launch: LaunchInfo, rank: int, beats=None,
              run_join: Callable[[Callable[[], object]], None] | None = None) -> ModelRunner:
    """Join the world as `rank` and build that rank's ModelRunner.

    With `beats`, the rank's heartbeat starts just before it joins: the driver waits for that first beat
    before joining itself. `run_join`, if given, runs the joining (the driver watches its workers meanwhile).
    """
    if rank != 0:  # rank 0 runs in the engine's process, on its segment
        startup_timeline.begin(f"rank{rank}")
    config = copy.deepcopy(config)
    if config.device.startswith("cuda"):
        index = launch.local_index(rank)
        torch.cuda.set_device(index)
        config.device = f"cuda:{index}"
    if beats is not None:
        start_heartbeat(beats, rank)
    join = functools.partial(init_parallel_state, launch.tp_size, launch.pp_size, rank, launch.master_addr,
                             launch.master_port, launch.backend, launch.timeout_s, launch.pp_layer_partition,
                             expert_parallel=config.parallel_config.enable_expert_parallel,
                             token_handoff=config.parallel_config.pp_token_handoff)
    (run_join or _call)(join)
    startup_timeline.mark("joined the group")
    return ModelRunner(config, source)


def _call(fn: Callable[[], object]) -> None:
    fn()


class ResultSender:
    """The last pipeline stage's sampled tokens, sent to rank 0 from a thread in step order, so the stage
    launches step n+1 while step n still runs instead of waiting for it (its device time is then busy
    time, and the wall time between results the stage's share of the pipeline: rank 0 reports the bubble)."""

    def __init__(self, group):
        self._channel = ObjectChannel(group)
        self._queue: queue.Queue = queue.Queue()
        self._last_ready = 0.0
        self._thread = threading.Thread(target=self._run, name="meshserve-stage-sender", daemon=True)
        self._thread.start()

    def put(self, pending, launched: float) -> None:
        """Queue a launched step's output; launched: when its launch began (time.perf_counter)."""
        self._queue.put((pending, launched))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            pending, launched = item
            try:
                out = pending.result()
                ready = time.perf_counter()
                out.busy_s, out.wall_s = out.device_time_s, ready - max(launched, self._last_ready)
                self._last_ready = ready
                self._channel.send(out, dst=0)
            except Exception as e:  # noqa: BLE001  (rank 0 waits on these tokens: leave, so it names this rank)
                logger.error("rank %d stopping: sending its step results failed: %s", dist.get_rank(),
                             str(e).splitlines()[0] if str(e) else type(e).__name__)
                os._exit(1)

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=5)


def serve_rank(runner: ModelRunner, rank: int) -> None:
    """The worker loop: run every broadcast call until rank 0 says shutdown. Steps are only queued on the
    device: no rank but the last stage's sampler returns anything, and that one sends from a thread."""
    st = get_parallel_state()
    sender = ResultSender(st.token_group or st.cpu_group) if rank == st.sampler_rank else None
    delta = StepDeltaReceiver()  # what earlier steps sent of each sequence (params, block table)
    calls = ObjectChannel(st.call_group)  # rank 0's calls, one gloo operation each; waits while the engine idles
    # rank 0 sends no-ops while idle; a wait far past them means its node is gone (distributed/call_liveness.py)
    watchdog = SilenceWatchdog(rank, silence_limit_s(runner.config.parallel_config.distributed_timeout_s))
    try:
        while True:
            with watchdog.waiting():
                method, args = calls.broadcast()
            if method == NOOP:
                continue
            if method == "shutdown":
                return
            if method.startswith("gather:"):
                result = getattr(runner, method[len("gather:"):])(*args)
                dist.gather_object(result, None, dst=0, group=st.cpu_group)
            elif method == "execute":
                # queue the step and take the next, as rank 0 does (waiting for the device left this
                # rank's GPU idle while it received and prepared each step: W1 8B at TP = 2 ran at 5.1 ms
                # per step for 3.4 ms of GPU work on 2 x H200)
                launched = time.perf_counter()
                pending = runner.launch(delta.restore(args[0]))
                if sender is not None:
                    sender.put(pending, launched)
            else:
                getattr(runner, method)(*args)
    finally:
        if sender is not None:
            sender.close()


def worker_main(config: EngineConfig, source, launch: LaunchInfo, rank: int, beats=None) -> None:
    """Process entry of a worker rank; exits non-zero on any failure so the driver can name it."""
    die_with_parent()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where a hung rank waits
    logging.basicConfig(level=os.environ.get("MESHSERVE_WORKER_LOG", "WARNING"),
                        format=f"rank{rank} %(levelname)s %(name)s: %(message)s")
    try:
        runner = init_rank(config, source, launch, rank, beats)
        serve_rank(runner, rank)
        runner.close()
    except Exception as e:  # noqa: BLE001  (a peer died or the driver went away: leave, loudly)
        logger.error("rank %d stopping: %s", rank, str(e).splitlines()[0] if str(e) else type(e).__name__)
        destroy_parallel_state()
        sys.exit(1)
    destroy_parallel_state()


def worker_process_main(config: EngineConfig, source, launch: LaunchInfo, rank: int, beats=None) -> None:
    """Entry of a spawned worker process: worker_main, then leave at once with its exit code.

    The rank holds nothing left to finalize once it is done, and the interpreter's own teardown (thousands of
    modules, torch's and gloo's native state) took 1.2-2.1 s of a quiet 2-core machine after a clean
    shutdown, and past the driver's 5 s wait on a loaded one, which then killed the rank (exit -9).
    """
    code = 0
    try:
        worker_main(config, source, launch, rank, beats)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    # what multiprocessing runs at a normal exit, which os._exit skips: it releases the semaphores made here
    # (tqdm's lock, as the weights load), which the resource tracker otherwise reports as leaked at shutdown
    multiprocessing.util._run_finalizers(0)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_node_ranks(config: EngineConfig, source, launch: LaunchInfo) -> int:
    """On a node without rank 0 (or a torchrun rank != 0): run this node's ranks until rank 0 finishes."""
    ranks = launch.local_ranks()
    if launch.torchrun:
        worker_main(config, source, launch, ranks[0])
        return 0
    source = with_checkpoint_shapes(source)  # once for this node's ranks, not in each
    config, source = without_transformers(config), without_transformers(source)  # (MultiprocExecutor)
    procs = [process_start.new_process(worker_process_main, (config, source, launch, r), name=f"meshserve-rank{r}")
             for r in ranks]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return max((p.exitcode or 0) for p in procs)
