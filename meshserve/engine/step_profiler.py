"""MESHSERVE_PROFILE_DIR: a torch.profiler trace of a window of steps on every rank, to see where a step's
time goes (host gaps, kernels, collectives waiting on a late rank).

Off unless the variable names a directory. Each rank skips MESHSERVE_PROFILE_SKIP steps (default 64: past
warm-up and prefill), records MESHSERVE_PROFILE_STEPS steps (default 16), then writes
rank{R}.json (a Chrome/Perfetto trace) and rank{R}.txt (the top operators by device and host time); a later
engine in the same process writes rank{R}-2.json, and so on.
While it is on, the engine core marks its phases (phase(): schedule, launch, drain, outputs) so that
tools/trace_gaps.py can say which of them the GPU waited for.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_PHASES = bool(os.environ.get("MESHSERVE_PROFILE_DIR"))  # read once: phase() is on the step's hot path


def phase(name: str):
    """A named range in the profiler's trace while MESHSERVE_PROFILE_DIR is set; otherwise nothing (a
    record_function costs microseconds a step even with no profiler running)."""
    return torch.profiler.record_function(name) if _PHASES else contextlib.nullcontext()


class StepProfiler:
    """Counts steps and runs torch.profiler over one window of them; a no-op when not configured."""

    def __init__(self, rank: int, directory: str | None = None):
        directory = directory if directory is not None else os.environ.get("MESHSERVE_PROFILE_DIR")
        self.dir = Path(directory) if directory else None
        self.rank = rank
        self.skip = int(os.environ.get("MESHSERVE_PROFILE_SKIP", "64"))
        self.steps = int(os.environ.get("MESHSERVE_PROFILE_STEPS", "16"))
        self._count = 0
        self._prof: torch.profiler.profile | None = None

    def step(self) -> None:
        """Call once per step, before it is launched."""
        if self.dir is None:
            return
        self._count += 1
        if self._count == self.skip + 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()
        elif self._count == self.skip + self.steps + 1 and self._prof is not None:
            self._finish()

    def _finish(self) -> None:
        prof, self._prof = self._prof, None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        # a later engine in the same process and folder (a bench's plain run, then its speculative one)
        # writes beside the earlier window: rank0-2.json, ...
        stem, n = f"rank{self.rank}", 1
        while (self.dir / f"{stem}.json").exists():
            n += 1
            stem = f"rank{self.rank}-{n}"
        prof.export_chrome_trace(str(self.dir / f"{stem}.json"))
        table = prof.key_averages().table(sort_by="self_device_time_total" if torch.cuda.is_available()
                                          else "self_cpu_time_total", row_limit=40)
        (self.dir / f"{stem}.txt").write_text(f"{self.steps} steps after {self.skip}\n{table}\n")
        logger.info("step profile of rank %d written to %s", self.rank, self.dir)
        self.dir = None  # one window per process
