"""Pipeline parallel in a simulated replica: steps in flight over stages in series, and the host that feeds them.

The engine with pp stages (EngineCore._step_pipelined) keeps `depth` steps in flight (--pipeline-depth, one per
stage unless told), each a batch of sequences no other step in flight holds (Scheduler.skip_pending: a sequence
waits until its last step's token is back): while fewer than depth are in flight it schedules and launches one;
once the pipeline is full, or nothing new could be scheduled, it waits for the oldest and processes its tokens.
A step passes every stage in turn; a stage works on one step at a time, in launch order; between stages the
step's hidden states and residual are sent to the next (a hop). So:
- a step's latency is the sum of its stage times and hops (plus waits for a busy stage);
- with depth >= pp steps in flight throughput is bounded by the slowest stage; with fewer, stages idle (bubbles);
- the host works on one step at a time: HostCosts.step_s per step (schedule, build and copy inputs, process
  outputs), so it bounds the rate of steps; the rest of a step's round trip (HostCosts.round_trip_s: the inputs'
  way to the first stage's worker and GPU, the tokens' way back) delays the step but keeps the host free.
  Measured on 2 x H200 (calibration.toml's [*.pipeline]) the host, not the GPUs, set the pace of the 8B's steps.

StagePipeline is the stages' timing alone (closed-form cases: tests/simulator/test_pipeline.py);
PipelinedReplica is SimReplica (the engine's own Scheduler on the simulated clock) with that loop instead of one
step at a time. Not modelled: step-time noise, decode runs laid out ahead (every step goes through the
scheduler).

Why two host numbers: one cost per step, all of it on the host (the model until 2026-12-01), had depth 2 faster
than depth 3 where the engine measured depth 3 faster. A sequence's cycle is its step's host time, round trip and
stages: at depth 2 two steps share a cycle, at depth 3 three, so the round trip weighs less per step at depth 3,
while the host's own time per step binds both alike. Only the split orders them as measured; the hand-off run
(where the round trip is off the sequences' path, below) is what separates the two numbers (PLANNER.md).

The token hand-off (--pp-token-handoff; engine/pipeline_stage.py TokenHandoff, TP = 1): the last stage sends each
step's sampled ids to the first stage over the device, and the scheduler (Scheduler.handoff_lag = pp) may run a
sequence again pp steps after its last without its token back on the host, so the host's round trip leaves the
sequences' critical path: step n's first stage waits on the device for step n - pp's ids instead. Each step takes
ceil(running / pp) sequences (pp groups, whatever the depth) where without it each of depth steps takes 1 / depth.
The host's own loop is unchanged (work on a step, in series; read back the oldest once depth are in flight), so
at depth pp + 1 steps come as often as without the hand-off, each holding more sequences: W2 at depth 3 runs
~2,060 steps instead of ~3,070. At depth pp the hand-off gains nothing (the host reads a step back before it
launches the one that needs its tokens).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshserve.engine.scheduler_output import SchedulerOutput
from meshserve.engine.step_time import StepShape
from meshserve.planner.hardware import GpuSpec
from meshserve.planner.model import ModelSpec
from meshserve.planner.perf import ACT_BYTES
from meshserve.simulator.replica import SimReplica
from meshserve.simulator.step_cost import calibration_entry


@dataclass(frozen=True)
class HostCosts:
    """The host's part of a pipelined step. step_s: the engine core's time on it (schedule, build the inputs,
    process the outputs), one step at a time, so it bounds the rate of steps. round_trip_s: the rest of the
    step's way through the host, which keeps the host free but delays the step (the inputs' way to the first
    stage's worker and GPU, the sampled tokens' way back); more steps in flight, or the token hand-off, hide it."""

    step_s: float = 0.0
    round_trip_s: float = 0.0


def load_host_costs(calibration: str = "default") -> HostCosts:
    """The calibration section's pipeline.host_step_ms and round_trip_ms (0 when the section has none: the host
    is then free, and the GPUs alone set the pace)."""
    table = calibration_entry(calibration).get("pipeline", {})
    return HostCosts(table.get("host_step_ms", 0.0) * 1e-3, table.get("round_trip_ms", 0.0) * 1e-3)


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

    def run(self, enter_s: float, shape: StepShape, inputs_s: float = 0.0) -> float:
        """A step enters the first stage at enter_s (its inputs on the device no earlier than inputs_s: the
        token hand-off's ids from the last stage): when its last stage ends."""
        t, free, busy, last = enter_s, self.free_s, self.busy_s, len(self.stage_costs) - 1
        last_free = free[last]
        for s, cost in enumerate(self.stage_costs):
            if s:
                t += self.hop(shape.num_tokens)
            else:
                t = max(t, inputs_s)
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

    def __init__(self, *args, stages: StagePipeline, depth: int, host: HostCosts, handoff_lag: int = 0,
                 token_hop_s: float = 0.0, **kwargs):
        kwargs["fast_forward"] = False  # no decode runs: each step is its own launch and read-back
        super().__init__(*args, **kwargs)
        self.scheduler.async_mode = self.scheduler.skip_pending = True
        # the token hand-off (--pp-token-handoff): the scheduler may run a sequence again handoff_lag steps after
        # its last, before that token is back on the host; the step's first stage waits on the device for the
        # ids of step n - handoff_lag (TokenHandoff receives them whether step n needs them or not)
        self.scheduler.handoff_lag = handoff_lag
        self.stages = stages
        self.depth = depth
        self.host = host
        self.token_hop_s = token_hop_s
        self._pipe: deque[tuple[SchedulerOutput, float]] = deque()  # steps in flight: (output, last stage's end)
        self._ends: deque[float] = deque(maxlen=handoff_lag or 1)  # the last handoff_lag steps' ends

    def start_step(self, now: float) -> float | None:
        """The host at now: launch a step while fewer than depth are in flight, else (or when nothing could be
        scheduled) read back the oldest once it has ended. Returns when the host next acts, None when idle."""
        self.now = now
        pipe = self._pipe
        lag = self.scheduler.handoff_lag
        while True:
            launched = False
            if len(pipe) < self.depth:
                out = self._schedule()
                if out is not None:
                    shape = self._shape(out)
                    ready = now + self.host.step_s  # the host's work for it, then its way to the first stage
                    inputs = self._ends[0] + self.token_hop_s if lag and len(self._ends) == lag else 0.0
                    end = self.stages.run(ready + self.host.round_trip_s, shape, inputs)
                    self._ends.append(end)
                    pipe.append((out, end))
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
