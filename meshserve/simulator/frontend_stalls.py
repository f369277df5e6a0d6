"""API-process stalls: stretches in which a `meshserve serve` API process does no work at all.

Until 054ccb3 (2026-12-01) an API process's full garbage collections walked its ~240k start-up objects with
the GIL held: 0.1-0.4 s with the event loop stopped, under load a few times a second; since, the process freezes
its start-up heap once serving (`serve --no-gc-freeze` brings the stalls back). Every W3 run before that build
has them (the sessions up to the seventh); the tenth session's (one API process, ITL p99 85 ms against 294 ms,
429s in 5 ms p99 30 ms against 10 ms p99 0.40 s) does not.

The server's step trace of W3 with targets on one API process (`w3_8b_slo_api1_h200_1130s7_steps.jsonl.gz`, QPS
64) shows them as the core sees them: for 6-14 steps (0.2-0.5 s) no new request reaches the core while Poisson
arrivals keep coming (the queue falls by exactly the admissions, two per step), then one step receives 8-25 at
once: the process, back, parsed what had piled up, and its gate let the pile through because a stall enters its
delay signals only when the stalled timer fires (serve/frontend_load.py). The stall holds every stream's tokens
(that run's ITL p99: 0.29 s at QPS 64, 0.38 s at 128, on 36 ms steps), so first tokens come late against their
prediction, and the worst-of-the-last-second delay signals carry it for 0.5-1 s more: the gate refuses while
the core's queue drains. That is why that server's prediction errors were wide (its admission margin at 0.76
by its first refusal, engine/admission_margin.py) and its queue swung (5-35 waiting) where a smooth
first-come-first-served queue (frontend.py) keeps it pinned at the margin.

Fitted (fit_stalls) from that trace: a stall is a run of at least MIN_DRAIN_STEPS steps without arrivals that
ends in a burst; its length is the burst over the offered rate (what arrived while the process was away, every
one let through: a lower bound, the core check refuses part of it), and the runs that end without a burst are
the gate closed after a stall, not a stall. A collection comes after so many allocations, so stalls come with
the requests a process takes in: each intake starts one with probability (stalls per second) / (requests the
process took in per second) of the fitted point, its length drawn from the fitted ones (StallStream: its own
generator per seed, replica and process, so a run is deterministic for a seed). Four API processes each take a
quarter of the requests: a quarter of the stalls each, each stall holding a quarter of the streams (that run's
ITL p99: 70 ms).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# a run of this many steps without arrivals (at ~2.4 arrivals a step at QPS 64: e^-14 by chance) is a stall or
# the gate closed after one; a burst of at least MIN_BURST requests in the next two steps tells a stall
MIN_DRAIN_STEPS = 6
MIN_BURST = 4
BUSY_RUNNING = 200  # steps with this many running are the busy stretch (past the knee: 256)
ADMITTED_PER_STEP = 2  # W3's 512-token prompts under the 1,024-token per-step prompt cap


@dataclass(frozen=True)
class FrontEndStalls:
    """Stalls per API process: rate_per_s (Poisson) and the measured lengths they draw from, in seconds."""

    rate_per_s: float
    durations_s: tuple[float, ...]
    # requests the process took in per second while they were measured: stalls come with intakes
    intake_rate_per_s: float = 1.0
    source: str = ""

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0 and bool(self.durations_s)

    @property
    def per_intake(self) -> float:
        """The chance that an intake starts a stall."""
        return self.rate_per_s / self.intake_rate_per_s


def fit_stalls(trace: str | Path, qps: float, intake_rate_per_s: float, segment: int = 0) -> FrontEndStalls:
    """Stalls from a one-API-process step trace (`serve --step-trace`) at offered rate qps, whose process took in
    intake_rate_per_s requests a second: the `segment`-th benchmark point in it (points are split at gaps of
    over 2 s)."""
    op = gzip.open if str(trace).endswith(".gz") else open
    with op(trace, "rt") as f:
        steps = [json.loads(line) for line in f if line.strip()]
    t = np.array([s["t"] for s in steps])
    cuts = [0, *(i + 1 for i in np.flatnonzero(np.diff(t) > 2.0)), len(t)]
    a, b = cuts[segment], cuts[segment + 1]
    running = np.array([s["running"] for s in steps[a:b]])
    busy = np.flatnonzero(running >= BUSY_RUNNING)
    lo, hi = a + busy[0], a + busy[-1] + 1
    t = t[lo:hi]
    waiting = np.array([s["waiting"] for s in steps[lo:hi]])
    dw = np.diff(waiting)
    durations, i = [], 0
    while i < len(dw):
        if dw[i] >= 0:
            i += 1
            continue
        j = i
        while j < len(dw) and dw[j] < 0:
            j += 1
        burst = sum(int(x) + ADMITTED_PER_STEP for x in dw[j:j + 2] if x > 0)
        if j - i >= MIN_DRAIN_STEPS and burst >= MIN_BURST:
            durations.append(round(burst / qps, 4))
        i = j
    span = float(t[-1] - t[0])
    return FrontEndStalls(len(durations) / span, tuple(sorted(durations)), intake_rate_per_s,
                          source=f"{Path(trace).name} at QPS {qps:g}")


# fit_stalls(benchmarks/results/w3_8b_slo_api1_h200_1130s7_steps.jsonl.gz, 64, 1670 / 31.8): the point's
# completed requests over its length as the intakes (all but some of its 250 refusals);
# tests/simulator/test_frontend_stalls.py checks that the fit still gives these
STALLS_H200 = FrontEndStalls(
    rate_per_s=0.3976, durations_s=(0.0625, 0.0625, 0.0625, 0.0781, 0.0938, 0.2188, 0.2188, 0.2344, 0.25, 0.2656),
    intake_rate_per_s=52.51, source="w3_8b_slo_api1_h200_1130s7_steps.jsonl.gz at QPS 64")


class StallStream:
    """One API process's stalls: for each of its intakes in turn, the stall it starts (0: none), drawn from its
    own generator."""

    def __init__(self, stalls: FrontEndStalls, seed: int, replica: int, process: int):
        self._rng = np.random.default_rng([seed, replica, process, 0x57A11])
        self._chance = stalls.per_intake
        self._durations = np.asarray(stalls.durations_s, dtype=float)

    def after_intake(self) -> float:
        """The length of the stall this intake starts, 0.0 for none."""
        if self._rng.random() >= self._chance:
            return 0.0
        return float(self._durations[self._rng.integers(len(self._durations))])
