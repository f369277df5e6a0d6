"""The real EngineCore with its model removed and an emulated device, for `bench frontend_server --real-core`.

Everything of the serving core runs (its process and loop, the ZeroMQ intake and outputs, the scheduler, the
SLO admission and shedding, the step-time model, the step trace, the runner's _prepare and launch, the async
hand-over of sampled ids) except the forward and the sampler (host_overhead.remove_model). The device is
emulated: a launched step's ids become ready only when a device that runs one step at a time would have
finished it, base + per_token x tokens + per_context_token x KV tokens read after its launch (EmulatedDevice);
result() sleeps until then, so with async scheduling the host's work overlaps the "device" as on a GPU, and a
host slower than the device never waits. The step-time model observes the emulated times, as it observes
CUDA events' on a GPU.

--core-timing PATH attaches engine/core_timing.py's CoreTiming: the core thread's CPU time per loop iteration
and its parts (time.thread_time, not wall: a 2-core machine is shared with the API processes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

from meshserve.config import EngineArgs
from meshserve.engine.step_time import StepShape

# W3 on an H200 (Qwen3-0.6B, 256 running, 1024-token prefill chunks): a least-squares fit of the step trace's
# device times, benchmarks/results/h200_1202_s21/w3_default/steps.jsonl.gz (actual_s ~ tokens, context)
H200_QWEN3_06B_BASE_MS = 1.127
H200_QWEN3_06B_US_PER_TOKEN = 2.70
H200_QWEN3_06B_US_PER_CONTEXT_TOKEN = 0.0342


@dataclass(frozen=True)
class EmulatedDevice:
    """A step's device time from its shape: base_s + per_token_s x new tokens + per_context_token_s x KV tokens."""

    base_s: float
    per_token_s: float = 0.0
    per_context_token_s: float = 0.0

    def time_s(self, shape: StepShape) -> float:
        return self.base_s + self.per_token_s * shape.num_tokens + self.per_context_token_s * shape.context_tokens


class EmulatedTimer:
    """Stands in for the runner's StepTimer: elapsed_s() waits until the emulated step is done (as a CUDA event
    is waited on) and returns its device time."""

    def __init__(self, ready_at: float, device_s: float):
        self.ready_at, self.device_s = ready_at, device_s

    def elapsed_s(self) -> float:
        wait = self.ready_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return self.device_s


def emulate_device(runner, device: EmulatedDevice) -> None:
    """Wrap a model-less runner's launch: each step with a timer starts on the emulated device when both it is
    launched and the step before it is done (one stream), and ends device.time_s(shape) later."""
    launch = runner.launch
    done_at = [0.0]

    def emulated_launch(out):
        pending = launch(out)
        if getattr(pending, "timer", None) is not None:  # a step that ran (an empty one has no timer)
            device_s = device.time_s(out.shape if out.shape is not None else StepShape.of(out.scheduled))
            done_at[0] = max(time.perf_counter(), done_at[0]) + device_s
            pending.timer = EmulatedTimer(done_at[0], device_s)
        return pending

    runner.launch = emulated_launch


def emulated_prior(core, preset: str, gpu: str) -> None:
    """The core's step-time model as a GPU's engine starts it: the whole preset's weight and KV bytes (the core
    runs --real-core-layers of it on the CPU) at `gpu`'s data-sheet rates (planner catalog). Without it the prior
    prices a step at the CPU's rates (50 GB/s: ~130 ms for one layer of an 8B and its fp32 embedding and head),
    and SLO admission refuses every request of a --slo-tpot-ms run until the fit has seen steps it never runs."""
    from meshserve.engine.step_time import DeviceRates, StepTimeModel
    from meshserve.planner.hardware import get_gpu
    from meshserve.planner.memory import kv_bytes_per_token, weight_bytes
    from meshserve.planner.model import load_model

    model, spec = load_model(preset), get_gpu(gpu)
    core.step_model = StepTimeModel(
        weight_bytes=weight_bytes(model) * model.active_params / model.total_params, params=model.active_params,
        kv_bytes_per_token=kv_bytes_per_token(model), rates=DeviceRates(spec.hbm_bytes_per_s, spec.flops_per_s("bf16")))
    core.scheduler.policy.step_model = core.step_model


def _build_real_core(args: EngineArgs, device: EmulatedDevice, timing_path: str | None, prior_gpu: str | None = None):
    from meshserve.bench.host_overhead import remove_model
    from meshserve.engine.core import EngineCore
    from meshserve.engine.core_timing import CoreTiming

    core = EngineCore.from_engine_args(args)
    remove_model(core.runner)
    emulate_device(core.runner, device)
    if prior_gpu:
        emulated_prior(core, args.model, prior_gpu)
    if timing_path:
        CoreTiming(core, timing_path)
    return core


def real_core_factory(device: EmulatedDevice, timing_path: str | None = None, prior_gpu: str | None = None) -> partial:
    """A picklable core factory for CoreProcess (it runs in the spawned core process); prior_gpu: emulated_prior's
    GPU (None: the step-time model's prior for the CPU)."""
    return partial(_build_real_core, device=device, timing_path=timing_path, prior_gpu=prior_gpu)
