"""API-process stalls: stretches in which a `meshserve serve` API process does no work at all.

The server's step trace of W3 with targets on one API process (`w3_8b_slo_api1_h200_1130s7_steps.jsonl.gz`, QPS
64) shows them as the core sees them: for 6-14 steps (0.2-0.5 s) no new request reaches the core while Poisson
arrivals keep coming (the queue falls by exactly the admissions, two per step), then one step receives 8-25 at
once. The process was stalled (its event loop did not run: a collection, the GIL held elsewhere; the cause is
not identified) and, once back, parsed what had piled up; its gate let the pile through because the stall
enters its delay signals only when the stalled timer fires (serve/frontend_load.py). The stall then holds every
stream's tokens (the client's ITL p99 of that run, 0.29 s at QPS 64 and 0.38 s at 128, against 36 ms steps),
so first tokens come late against their prediction, and the worst-of-the-last-second delay signals carry it for
0.5-1 s more: the gate refuses while the core's queue drains. That is why the server's prediction errors are
wide (its admission margin settles at 0.76-0.86, engine/admission_margin.py) and its queue swings (5-35
waiting) where a smooth first-come-first-served queue (frontend.py) keeps it pinned at the margin.

Fitted (fit_stalls) from that trace: a stall is a run of at least MIN_DRAIN_STEPS steps without arrivals that
ends in a burst; its length is the burst over the offered rate (what arrived while the process was away, every
one let through: a lower bound, the core check refuses part of it), its rate the number of such runs over the
busy stretch. Runs that end without a burst are the gate closed after a stall, not a stall. Stalls start as a
Poisson process per API process and draw their length from the fitted ones (StallStream: its own generator per
seed, replica and process, so a run is deterministic for a seed), scaled by the requests the process holds
against the ~260 (running + waiting) of the fitted stretch: a hypothesis (a pause that grows with the live
objects, as a collection's does), not measured. It is what reconciles the other runs: with four API processes
(~65 requests each past the knee) the measured ITL p99 is 66-70 ms, a ~35 ms hold on 36 ms steps, and at light
load their TTFT p99 shows no stalls at all (101 ms at QPS 32); unscaled, the table held tokens 0.24 s there.
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
    # requests the process held (running + waiting) while they were measured: a stall's length scales with them
    ref_in_flight: float = 1.0
    source: str = ""

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0 and bool(self.durations_s)


def fit_stalls(trace: str | Path, qps: float, segment: int = 0) -> FrontEndStalls:
    """Stalls from a one-API-process step trace (`serve --step-trace`) at offered rate qps: the `segment`-th
    benchmark point in it (points are split at gaps of over 2 s)."""
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
    held = float(np.mean(running[busy[0]:busy[-1] + 1] + waiting))
    return FrontEndStalls(len(durations) / span, tuple(sorted(durations)), round(held, 1),
                          source=f"{Path(trace).name} at QPS {qps:g}")


# fit_stalls(benchmarks/results/w3_8b_slo_api1_h200_1130s7_steps.jsonl.gz, 64): tests/simulator/test_frontend_stalls.py
# checks that the fit still gives these
STALLS_H200 = FrontEndStalls(
    rate_per_s=0.3976, durations_s=(0.0625, 0.0625, 0.0625, 0.0781, 0.0938, 0.2188, 0.2188, 0.2344, 0.25, 0.2656),
    ref_in_flight=260.3,
    source="w3_8b_slo_api1_h200_1130s7_steps.jsonl.gz at QPS 64")


class StallStream:
    """One API process's stalls in time order: (start, length at the fitted load) pairs, drawn lazily from its own
    generator (the caller scales a length by the requests its process holds over stalls.ref_in_flight)."""

    def __init__(self, stalls: FrontEndStalls, seed: int, replica: int, process: int):
        self._rng = np.random.default_rng([seed, replica, process, 0x57A11])
        self._rate = stalls.rate_per_s
        self._durations = np.asarray(stalls.durations_s, dtype=float)
        self.next_start = float(self._rng.exponential(1.0 / self._rate))

    def pop(self) -> tuple[float, float]:
        """The next stall (start, length), and draw the one after."""
        start = self.next_start
        length = float(self._durations[self._rng.integers(len(self._durations))])
        self.next_start = start + float(self._rng.exponential(1.0 / self._rate))
        return start, length
