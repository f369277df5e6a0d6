"""Step-time noise: how far a measured step strays from the step-time model, and the host gap between steps.

The step-time model (step_cost.py) predicts a step's mean; a real step varies around it (clocks, the allocator,
a kernel compiled late) and the host leaves the GPU idle between steps while the engine core takes requests in.
Without that spread every simulated step lasts exactly its prediction, and TTFT p99 comes out far short of the
measured. Both are fitted from a `--step-trace` file (fit_step_noise) as empirical quantile tables, stored in
calibration.toml beside the weights they were measured against:
- the ratio measured / predicted device time, per step kind (decode-only, carrying prefill);
- the host gap: the time from one step's end to the next one's that the GPU did not spend on the next step
  (the trace's `t` is when a step's tokens were processed, so t[i+1] - t[i] - actual[i+1]), split by whether
  at least QUEUE_GAP_MIN requests were waiting after step i: in our traces the gaps come almost only with a
  backlog (the core takes in and refuses requests between steps: 8-12 ms gaps before ~15% of the steps past
  the knee), ~0 otherwise (W3 1130: mean 0.007 ms with nobody waiting, 0.2 ms with 1-3, 0.8-3.3 ms with 4+). Gaps below 0 are the timer's jitter (a step processed
  late makes the next interval short); they are kept so that the mean gap, which sets how busy the GPU is,
  stays the trace's.

A replica draws its noise by step index from its own generator (NoiseStream): step s of replica r gets the same
draws whichever replica model runs it and however its decode steps are laid out, so a run is deterministic
for a seed and the fast model can be checked against the reference step for step.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from meshserve.errors import InvalidArgumentError

# Where the tables are cut: every percentile, finer in the tails (TTFT p99 lives there). Draws interpolate
# linearly between cuts, which smears a jump (a gap is ~0 or ~10 ms) over one cut's width: 1% keeps the mean
# gap, which sets how busy the GPU is, within a few % of the trace's.
QUANTILES = (0.0, 0.001, 0.002, 0.005, *(i / 100 for i in range(1, 100)), 0.995, 0.998, 0.999, 1.0)
# a backlog: this many requests waiting when a step is decided draw the gap from gap_waiting_ms
QUEUE_GAP_MIN = 4
# intervals longer than this between processed steps are idle periods (the trace spans several benchmark points)
IDLE_INTERVAL_S = 1.0
_CHUNK = 1024  # steps drawn at once per replica


@dataclass(frozen=True)
class StepNoise:
    """Quantile tables over QUANTILES: measured / predicted device time for decode-only steps and for steps
    carrying prefill; the host gap in ms before a step, without and with a backlog (QUEUE_GAP_MIN waiting)."""

    decode_ratio: tuple[float, ...]
    mixed_ratio: tuple[float, ...]
    gap_ms: tuple[float, ...]
    gap_waiting_ms: tuple[float, ...]
    source: str = ""

    def __post_init__(self):
        for name in ("decode_ratio", "mixed_ratio", "gap_ms", "gap_waiting_ms"):
            table = getattr(self, name)
            if len(table) != len(QUANTILES) or any(b < a for a, b in pairwise(table)):
                raise InvalidArgumentError(
                    f"step noise {name} must be {len(QUANTILES)} non-decreasing values", param="step_noise"
                )

    def as_toml(self) -> str:
        """The [<fit>.step_noise] table's lines (calibration.toml)."""

        def row(values):  # ten to a line
            lines = [", ".join(f"{v:.4g}" for v in values[i : i + 10]) for i in range(0, len(values), 10)]
            return "[\n    " + ",\n    ".join(lines) + ",\n]"

        return (
            f'source = "{self.source}"\ndecode_ratio = {row(self.decode_ratio)}\n'
            f"mixed_ratio = {row(self.mixed_ratio)}\ngap_ms = {row(self.gap_ms)}\n"
            f"gap_waiting_ms = {row(self.gap_waiting_ms)}"
        )


def has_step_noise(calibration: str = "default") -> bool:
    """Whether a calibration.toml fit has a step_noise table."""
    try:
        load_step_noise(calibration)
    except InvalidArgumentError:
        return False
    return True


def load_step_noise(calibration: str = "default") -> StepNoise:
    """The step_noise table of a calibration.toml fit (the one an alias such as "default" names)."""
    from meshserve.simulator.step_cost import calibration_entry

    noise = calibration_entry(calibration).get("step_noise")
    if not isinstance(noise, dict):
        raise InvalidArgumentError(
            f"calibration {calibration!r} has no step_noise table in calibration.toml: "
            "run with --step-noise off",
            param="step_noise",
        )
    return StepNoise(
        tuple(noise["decode_ratio"]),
        tuple(noise["mixed_ratio"]),
        tuple(noise["gap_ms"]),
        tuple(noise["gap_waiting_ms"]),
        noise.get("source", ""),
    )


def trace_samples(rows: list[dict], predict) -> dict[str, np.ndarray]:
    """A step trace's samples: ratio measured / predict(row) per step kind; host gaps in seconds after a step
    without and with a backlog (intervals past IDLE_INTERVAL_S, between benchmark points, left out)."""
    t = np.array([r["t"] for r in rows])
    actual = np.array([r["actual_s"] for r in rows])
    predicted = np.array([predict(r) for r in rows])
    mixed = np.array([r["tokens"] > r["seqs"] for r in rows])
    waiting = np.array([r.get("waiting", 0) >= QUEUE_GAP_MIN for r in rows])
    ratio = actual / predicted
    interval = np.diff(t)
    gap = interval - actual[1:]
    busy = (interval >= 0) & (interval < IDLE_INTERVAL_S)  # >= 0: where one of several traces joins the next
    return {
        "decode_ratio": ratio[~mixed],
        "mixed_ratio": ratio[mixed],
        "gap_s": gap[busy & ~waiting[:-1]],
        "gap_waiting_s": gap[busy & waiting[:-1]],
    }


def fit_step_noise(rows: list[dict], predict, source: str = "") -> StepNoise:
    """Quantile tables of a step trace (see trace_samples); predict(row) is the simulator's prediction in
    seconds for the row's shape, with the fit's weights."""
    s = trace_samples(rows, predict)
    for name, values in s.items():
        if len(values) < 20:
            raise InvalidArgumentError(
                f"the step trace has {len(values)} samples of {name}: too few to fit noise",
                param="step_trace",
            )

    def table(values, scale=1.0):
        return tuple(float(v) * scale for v in np.quantile(values, QUANTILES))

    return StepNoise(
        table(s["decode_ratio"]),
        table(s["mixed_ratio"]),
        table(s["gap_s"], 1e3),
        table(s["gap_waiting_s"], 1e3),
        source,
    )


class NoiseStream:
    """One replica's draws, by step index: factor(s, mixed, waiting) -> (ratio, gap_s) for its step s. Chunk c
    (steps c * _CHUNK ...) is drawn from numpy's generator seeded with (seed, replica index, c), two uniforms per
    step (the ratio's, the gap's) mapped through the tables (inverse CDF, linear between quantiles), so any step
    can be drawn again alike (a decode run cut by an arrival is laid out again) and only a few chunks are kept."""

    __slots__ = ("_chunks", "_index", "_q", "_seed", "_tables")

    def __init__(self, noise: StepNoise, seed: int, index: int):
        self._seed = seed
        self._index = index
        self._q = np.array(QUANTILES)
        self._tables = [
            np.array(t) for t in (noise.decode_ratio, noise.mixed_ratio, noise.gap_ms, noise.gap_waiting_ms)
        ]
        # the latest chunks by number: decode ratio and gap (s) as lists (decode runs slice them); mixed ratio
        # and gap with a backlog (s) as arrays (one explicit step at a time reads them)
        self._chunks: dict[int, tuple] = {}

    def _chunk(self, c: int) -> tuple:
        chunk = self._chunks.get(c)
        if chunk is None:
            q, (decode, mixed, gap, gap_waiting) = self._q, self._tables
            u_ratio, u_gap = np.random.default_rng([self._seed, self._index, c]).random((2, _CHUNK))
            chunk = self._chunks[c] = (
                np.interp(u_ratio, q, decode).tolist(),
                np.interp(u_ratio, q, mixed),
                (np.interp(u_gap, q, gap) * 1e-3).tolist(),
                np.interp(u_gap, q, gap_waiting) * 1e-3,
            )
            if len(self._chunks) > 3:
                del self._chunks[next(iter(self._chunks))]  # the oldest drawn
        return chunk

    def factor(self, step: int, mixed: bool, waiting: int) -> tuple[float, float]:
        """(ratio, gap seconds) of step `step` (0-based) of this replica, decided with `waiting` requests
        waiting."""
        c, i = divmod(step, _CHUNK)
        chunk = self._chunks.get(c) or self._chunk(c)
        ratio = chunk[1].item(i) if mixed else chunk[0][i]
        return ratio, chunk[3].item(i) if waiting >= QUEUE_GAP_MIN else chunk[2][i]

    def apply(self, step: int, device_s: float, mixed: bool, waiting: int) -> tuple[float, float]:
        """(wall seconds, device seconds) of step `step` whose model time is device_s: the device time times
        its ratio, then the host gap before it (a negative gap, timer jitter, never below half the step)."""
        ratio, gap = self.factor(step, mixed, waiting)
        device = device_s * ratio
        return max(device + gap, 0.5 * device), device

    def apply_decode(self, first: int, durations: list[float]) -> tuple[list[float], list[float]]:
        """apply() of decode steps first, first + 1, ... with nobody waiting (a decode run's), model times
        `durations`: (walls, devices), the same floats, a chunk's slice at a time."""
        c, o = divmod(first, _CHUNK)
        if o + len(durations) <= _CHUNK:  # within one chunk (nearly always)
            chunk = self._chunks.get(c) or self._chunk(c)
            end = o + len(durations)
            devices = [d * r for d, r in zip(durations, chunk[0][o:end])]
            return [
                w if (w := d + g) > 0.5 * d else 0.5 * d for d, g in zip(devices, chunk[2][o:end])
            ], devices
        walls: list[float] = []
        devices = []
        i, n = 0, len(durations)
        while i < n:
            c, o = divmod(first + i, _CHUNK)
            chunk = self._chunks.get(c) or self._chunk(c)
            m = min(n - i, _CHUNK - o)
            dev = [d * r for d, r in zip(durations[i : i + m], chunk[0][o : o + m])]
            devices += dev
            walls += [w if (w := d + g) > 0.5 * d else 0.5 * d for d, g in zip(dev, chunk[2][o : o + m])]
            i += m
        return walls, devices


def _main() -> None:
    """fit: python -m meshserve.simulator.step_noise TRACE[,TRACE...] [CALIBRATION] [GPU] [MODEL]"""
    import sys

    from meshserve.engine.step_time import StepShape
    from meshserve.planner.hardware import get_gpu
    from meshserve.planner.model import load_model
    from meshserve.simulator.step_cost import StepCost, load_calibration, read_step_traces

    args = sys.argv[1:] + [None] * 3
    cost = StepCost(
        load_model(args[3] or "llama-3.1-8b"),
        get_gpu(args[2] or "H200"),
        weights=load_calibration(args[1] or "default"),
    )
    fitted = fit_step_noise(
        read_step_traces(args[0]),
        lambda r: cost(StepShape(r["tokens"], r["seqs"], r["context"])),
        source=args[0],
    )
    print(fitted.as_toml())


if __name__ == "__main__":
    from meshserve.simulator.script_main import run_script

    run_script(_main, "meshserve.simulator.step_noise")
