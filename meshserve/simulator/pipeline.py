"""Pipeline parallel in a simulated replica: steps in flight over stages in series, and the host that feeds them.

The engine with pp stages (EngineCore._step_pipelined) keeps `depth` steps in flight (--pipeline-depth, one per
stage unless told), each a batch of sequences no other step in flight holds (Scheduler.skip_pending: a sequence
waits until its last step's token is back): while fewer than depth are in flight it schedules and launches one;
once the pipeline is full, or nothing new could be scheduled, it waits for the oldest and processes its tokens.
A step passes every stage in turn; a stage works on one step at a time, in launch order; between stages the
step's hidden states and residual are sent to the next (a hop). So:
- a step's latency is the sum of its stage times and hops (plus waits for a busy stage);
- with depth >= pp steps in flight throughput is bounded by the slowest stage; with fewer, stages idle (bubbles);
- the host works on one step at a time: `host_s` per step (schedule, build and copy inputs, process outputs)
  before the step can enter the first stage. Measured on 2 x H200 (calibration.toml's [*.pipeline]) it, not the
  GPUs, set the pace of the 8B's steps of ~85-128 sequences.

StagePipeline is the stages' timing alone (closed-form cases: tests/simulator/test_pipeline.py);
PipelinedReplica is SimReplica (the engine's own Scheduler on the simulated clock) with that loop instead of one
step at a time. Not modelled: step-time noise, decode runs laid out ahead (every step goes through the
scheduler), the token hand-off (--pp-token-handoff).
"""

from __future__ import annotations

import tomllib
from collections import deque
from collections.abc import Callable, Sequence

from meshserve.engine.scheduler_output import SchedulerOutput
from meshserve.engine.step_time import StepShape
from meshserve.planner.hardware import GpuSpec
from meshserve.planner.model import ModelSpec
from meshserve.planner.perf import ACT_BYTES
from meshserve.simulator.replica import SimReplica
from meshserve.simulator.step_cost import CALIBRATION_FILE


def load_host_step_s(calibration: str = "default") -> float:
    """Seconds of host work per pipelined step: the calibration section's pipeline.host_step_ms (0 when the
    section has none: the host is then free, and the GPUs alone set the pace)."""
    sections = tomllib.loads(CALIBRATION_FILE.read_text())
    entry = sections.get(calibration)
    if isinstance(entry, str):  # an alias ("default")
        entry = sections.get(entry)
    table = entry.get("pipeline", {}) if isinstance(entry, dict) else {}
    return table.get("host_step_ms", 0.0) * 1e-3


def hop_s(model: ModelSpec, gpu: GpuSpec, num_tokens: int, same_node: bool = True) -> float:
    """One stage's hand-off to the next: the step's hidden states and residual (bf16), over NVLink when both
    stages are in one node (the catalog's link), else the network (the planner's pp_hop_s link)."""
    nbytes = 2 * num_tokens * model.hidden_size * ACT_BYTES
    if same_node:
        return gpu.link_latency_us * 1e-6 + nbytes / (gpu.link_gb_s * 1e9)
    return gpu.inter_node_latency_us * 1e-6 + nbytes / (gpu.inter_node_gb_s * 1e9)


class StagePipeline:
    """pp stages in series, each busy with one step at a time in the order steps enter: a step that enters at
    t starts stage s once its previous stage's output has arrived (its end + the hop) and stage s is free.

    stage_costs[s](shape): stage s's seconds for a step; hop(num_tokens): seconds from one stage to the next.
    Kept per stage: when it is next free and its busy seconds; for the last stage, the wall time the engine's
    bubble counts (EngineCore.pp_bubble: from a step's launch, or the previous step's end if later, to its end)."""

    def __init__(self, stage_costs: Sequence[Callable[[StepShape], float]], hop: Callable[[int], float]):
        self.stage_costs = list(stage_costs)
        self.hop = hop
        self.free_s = [0.0] * len(self.stage_costs)
        self.busy_s = [0.0] * len(self.stage_costs)
        self.last_wall_s = 0.0

    @property
    def num_stages(self) -> int:
        return len(self.stage_costs)

    def run(self, enter_s: float, shape: StepShape) -> float:
        """A step enters the first stage at enter_s: when its last stage ends."""
        t, free, busy, last = enter_s, self.free_s, self.busy_s, len(self.stage_costs) - 1
        last_free = free[last]
        for s, cost in enumerate(self.stage_costs):
            if s:
                t += self.hop(shape.num_tokens)
            d = cost(shape)
            t = max(t, free[s]) + d
            free[s] = t
            busy[s] += d
        self.last_wall_s += t - max(enter_s, last_free)
        return t

    @property
    def bubble(self) -> float:
        """The last stage's idle share of its wall time, as the engine measures it (0 before any step)."""
        return 1.0 - self.busy_s[-1] / self.last_wall_s if self.last_wall_s else 0.0


class PipelinedReplica(SimReplica):
    """A replica of pp stages: the engine's pipelined loop (EngineCore._step_pipelined) on the simulated clock.

    The fleet's protocol is SimReplica's: start_step(now) returns the time of the replica's next event (the host
    free again after launching a step, or the oldest step's end that it waits for), end_step at that time hands
    back to start_step. The scheduler runs as the engine runs it with stages (async mode: a step's tokens count
    as computed when it is scheduled; skip_pending: a sequence with a step in flight is not scheduled again)."""

    def __init__(self, *args, stages: StagePipeline, depth: int, host_s: float, **kwargs):
        kwargs["fast_forward"] = False  # no decode runs: each step is its own launch and read-back
        super().__init__(*args, **kwargs)
        self.scheduler.async_mode = self.scheduler.skip_pending = True
        self.stages = stages
        self.depth = depth
        self.host_s = host_s
        self._pipe: deque[tuple[SchedulerOutput, float]] = deque()  # steps in flight: (output, last stage's end)

    def start_step(self, now: float) -> float | None:
        """The host at now: launch a step while fewer than depth are in flight, else (or when nothing could be
        scheduled) read back the oldest once it has ended. Returns when the host next acts, None when idle."""
        self.now = now
        pipe = self._pipe
        while True:
            launched = False
            if len(pipe) < self.depth:
                out = self._schedule()
                if out is not None:
                    shape = self._shape(out)
                    ready = now + self.host_s  # the host's work for it, then the first stage may start
                    pipe.append((out, self.stages.run(ready, shape)))
                    self.steps += 1
                    self.busy = True
                    if ready > now:
                        return ready
                    launched = True
            if pipe and (len(pipe) == self.depth or not launched):
                out, end = pipe[0]
                if end > now:
                    return end
                pipe.popleft()
                self._apply_step(out, now)
                continue
            if not pipe:
                self.busy = False
                return None

    def end_step(self, now: float) -> float | None:
        """The event start_step asked for: the host acts again (start_step, which the fleet calls next)."""
        self.now = now
        return None

    @property
    def busy_s(self) -> float:
        """Device seconds of one GPU on average over the stages (the report's GPU busy fraction)."""
        busy = self.stages.busy_s
        return sum(busy) / len(busy)

    @busy_s.setter
    def busy_s(self, value: float) -> None:
        pass  # SimReplica's own counter (it sets 0 at start): the stages keep theirs
