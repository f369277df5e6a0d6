"""Executors run the model runner(s) for the engine: in-process for one device, or across processes.

`make_executor` picks one from the parallel config: one rank runs in-process (UniprocExecutor); more ranks
run as processes this node spawns (MultiprocExecutor) or as actors on a Ray cluster (RayExecutor).
"""

from __future__ import annotations

import logging
from typing import Protocol

from meshserve.config import EngineConfig
from meshserve.distributed.launch import launch_info
from meshserve.engine.model_runner import ModelRunner, ModelRunnerOutput, PendingOutput
from meshserve.engine.multiproc_executor import MultiprocExecutor
from meshserve.engine.ray_executor import RayExecutor
from meshserve.engine.scheduler_output import SchedulerOutput
from meshserve.models.loader import ModelSource

logger = logging.getLogger(__name__)


class Executor(Protocol):
    """What the engine drives, whatever the process layout.

    Every call reaches the ModelRunner of every rank, by method name; `execute` returns the sampler rank's
    output. An executor whose `supports_async_scheduling` is True also offers `execute_async`, which queues
    a step and returns a PendingOutput at once.
    """

    supports_async_scheduling: bool
    # whether rank 0's runner samples, so the engine may fill a step's grammar masks once its forward is
    # queued (SchedulerOutput.before_sample, called by rank 0's runner only) rather than before it is sent
    late_grammar_masks: bool

    def collective_rpc(self, method: str, *args): ...

    def gather_rpc(self, method: str, *args) -> list: ...

    def execute(self, sched_out: SchedulerOutput) -> ModelRunnerOutput: ...

    def shutdown(self) -> None: ...


class UniprocExecutor:
    """One process, one device: holds the only ModelRunner and calls it directly."""

    # the runner lives in this process, so its sampled ids can feed the next step on the device
    supports_async_scheduling = True
    late_grammar_masks = True

    def __init__(self, config: EngineConfig, source: ModelSource):
        self.runner = ModelRunner(config, source)

    def collective_rpc(self, method: str, *args):
        return getattr(self.runner, method)(*args)

    def execute(self, sched_out: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(sched_out)

    def execute_async(self, sched_out: SchedulerOutput) -> PendingOutput:
        """Queue the step; the returned PendingOutput's result() waits for it (async scheduling)."""
        return self.runner.launch(sched_out)

    def gather_rpc(self, method: str, *args) -> list:
        return [getattr(self.runner, method)(*args)]

    def shutdown(self) -> None:
        if self.runner is not None:
            self.runner.close()  # its graphs and KV cache go now, whoever still refers to the runner
        self.runner = None


def make_executor(config: EngineConfig, source: ModelSource) -> Executor:
    """The executor for config.parallel_config; only rank 0 builds one (other ranks run engine.worker)."""
    pc = config.parallel_config
    if pc.world_size == 1:
        return UniprocExecutor(config, source)
    launch = launch_info(pc, config.device)
    if launch.rank != 0:
        raise RuntimeError("only rank 0 builds the engine; other ranks run meshserve.engine.worker")
    if pc.distributed_executor_backend == "ray":
        return RayExecutor(config, source, launch)
    return MultiprocExecutor(config, source, launch)
