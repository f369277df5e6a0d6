"""The host's part of a pipelined decode step, for the planner's PP arithmetic (perf.itl_s).

The engine core works on one pipelined step at a time (schedule, build inputs, process outputs: `step_s`), and
each step also spends `round_trip_s` on its way to the first stage and its tokens' way back, which delays it
without keeping the host busy. The simulator models the same two numbers step by step
(simulator/pipeline.py HostCosts); here they enter the steady state in closed form. Measured on 2 x H200 the
host, not the GPUs, set the pace of the 8B's steps, which is why depth 3 beat depth 2 and the token hand-off
(--pp-token-handoff, TP = 1) gained ~20%: PLANNER.md "Pipeline parallel".

The fitted values are read from the simulator's calibration (one number, one place): its default section's
[pipeline] table. Assumed the same for every model and GPU (a CPU cost; fitted on one host with the 8B).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SIMULATOR_CALIBRATION = Path(__file__).resolve().parents[1] / "simulator" / "calibration.toml"


@dataclass(frozen=True)
class PipelineHost:
    """step_s: the host's own time per pipelined step (bounds the step rate); round_trip_s: the rest of a step's
    way through the host (delays it, keeps the host free); token_handoff: the engine's --pp-token-handoff (the
    last stage sends sampled ids to the first on the device: a sequence runs again pp steps after its last, each
    step holds 1/pp of the batch whatever the depth, and the round trip leaves the sequences' path)."""

    step_s: float = 0.0
    round_trip_s: float = 0.0
    token_handoff: bool = False

    def with_handoff(self, token_handoff: bool) -> PipelineHost:
        return PipelineHost(self.step_s, self.round_trip_s, token_handoff)


NO_HOST = PipelineHost()  # the stages alone (the planner's formula before the host costs)


@cache
def fitted_host() -> PipelineHost:
    """The simulator's default calibration's pipeline.host_step_ms and round_trip_ms (no hand-off), from the fit
    its `carries` key names where it has no table of its own (as simulator/step_cost.calibration_entry reads it)."""
    sections = tomllib.loads(SIMULATOR_CALIBRATION.read_text())
    entry = sections["default"]
    entry = sections[entry] if isinstance(entry, str) else entry
    while "pipeline" not in entry and entry.get("carries"):
        entry = sections[entry["carries"]]
    table = entry.get("pipeline", {})
    return PipelineHost(table.get("host_step_ms", 0.0) * 1e-3, table.get("round_trip_ms", 0.0) * 1e-3)


def pipelined_itl(passes_s: float, slowest_stage_s: float, steps_in_flight: int, pp: int,
                  host: PipelineHost) -> float:
    """Time between one sequence's tokens in the steady state of the engine's pipelined loop.

    Without the hand-off the batch is split over d = steps_in_flight steps; a sequence's cycle is its step's host
    time, round trip and pass through the stages (passes_s: stage times + hops), and the d steps take their turns
    on the slowest stage and on the host: max(host + round trip + passes, d x max(slowest stage, host)).
    With the hand-off the batch is split over pp steps, a sequence runs every pp steps, and a step comes every
    max(slowest stage, host, (host + round trip + passes) / d) (the host reads the oldest of d steps back before
    launching the next), but a sequence's next step cannot start its pass before its last one ended:
    max(passes, pp x that interval)."""
    if host.token_handoff:
        interval = max(slowest_stage_s, host.step_s, (host.step_s + host.round_trip_s + passes_s) / steps_in_flight)
        return max(passes_s, pp * interval)
    return max(host.step_s + host.round_trip_s + passes_s, steps_in_flight * max(slowest_stage_s, host.step_s))
