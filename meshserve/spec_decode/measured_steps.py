"""Measured device times of plain decode steps and verify steps, per batch-size bucket, for the speculation gate.

The step-time model (engine/step_time.py) prices a step by max(weight reads, FLOPs at peak): at batch 64 it
sees 192 verify rows as nearly as cheap as 64 plain ones, where the H200 took ~1.8x as long (issue 22,
2026-12-01: speculation stayed on at acceptance 0.38, k = 2, and ran at 0.86x). The engine times every step;
these running averages let the gate compare what the two kinds of step really cost at this batch.
"""

from __future__ import annotations

from dataclasses import dataclass

# samples of each kind a bucket needs before its averages replace the model
MIN_SAMPLES = 2


def batch_bucket(batch: int) -> int:
    """Power-of-two bucket of a batch size: 1 | 2 | 3-4 | 5-8 | ... | 33-64 | ..."""
    return max(batch - 1, 0).bit_length()


@dataclass
class StepAverage:
    """Running mean of one kind of step's device time (the first samples weigh equally, then a fixed decay)."""

    seconds: float = 0.0
    num_samples: int = 0
    last_step: int = -1  # the gate's step counter at the latest sample

    def add(self, seconds: float, step: int, decay: float) -> None:
        self.num_samples += 1
        w = max(1.0 / self.num_samples, 1.0 - decay)
        self.seconds += w * (seconds - self.seconds)
        self.last_step = step

    @property
    def ready(self) -> bool:
        return self.num_samples >= MIN_SAMPLES


class MeasuredSteps:
    """Per batch bucket: the average plain decode step and the average verify step, in seconds."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.plain: dict[int, StepAverage] = {}
        self.verify: dict[int, StepAverage] = {}

    def add(self, batch: int, verify: bool, seconds: float, step: int) -> None:
        if batch <= 0 or seconds <= 0.0:
            return
        table = self.verify if verify else self.plain
        table.setdefault(batch_bucket(batch), StepAverage()).add(seconds, step, self.decay)

    def verify_seconds(self, batch: int) -> float | None:
        """The average verify step at this batch's bucket, once measured."""
        avg = self.verify.get(batch_bucket(batch))
        return avg.seconds if avg is not None and avg.ready else None

    def times(self, batch: int) -> tuple[float, float] | None:
        """(plain, verify) seconds at this batch's bucket when both are measured, else None."""
        plain, verify = self.plain.get(batch_bucket(batch)), self.verify_seconds(batch)
        if plain is None or verify is None or not plain.ready:
            return None
        return plain.seconds, verify

    def wants_plain(self, batch: int, step: int, refresh_steps: int) -> bool:
        """Whether the next step at this batch should run plain to (re)measure: verify steps are measured
        here and plain ones are missing or older than refresh_steps."""
        b = batch_bucket(batch)
        verify = self.verify.get(b)
        if verify is None or not verify.ready:
            return False
        plain = self.plain.get(b)
        return plain is None or not plain.ready or step - plain.last_step > refresh_steps

    def wants_verify(self, batch: int, step: int, refresh_steps: int) -> bool:
        """Whether this batch's verify step time is missing or older than refresh_steps."""
        verify = self.verify.get(batch_bucket(batch))
        return verify is None or not verify.ready or step - verify.last_step > refresh_steps
