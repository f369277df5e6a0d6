"""Per-expert load of an MoE model, read from rank 0's runner for the core's published stats.

Every rank routes the whole batch, so rank 0's counters are the group's (with pipeline parallelism: its own
stage's layers). Reading them copies from the device (a sync), so the core reads at most once a period and
publishes the counts only with the step that read them; the front end keeps the last ones it saw.
"""

from __future__ import annotations

import time


class ExpertLoadReader:
    """Polls runner.expert_load() (tokens per expert, per MoE layer) at most once per `period_s`."""

    def __init__(self, runner, period_s: float = 5.0):
        self.runner = runner
        self.period_s = period_s
        self._read_at = -float("inf")
        # dense models have no counters: never read again
        self.enabled = runner is not None and bool(getattr(runner.model, "expert_layers", None))

    def poll(self, force: bool = False) -> list[list[int]]:
        """The counts when due (or forced), else [] (nothing new to publish)."""
        now = time.monotonic()
        if not self.enabled or (not force and now - self._read_at < self.period_s):
            return []
        self._read_at = now
        return self.runner.expert_load()
