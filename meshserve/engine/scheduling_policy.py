"""Where each step's budget comes from: static limits, or service-level targets and a step-time model.

Without targets the budget is today's: max_num_batched_tokens tokens over at most max_num_seqs sequences.
With targets (the server's --slo-ttft-ms / --slo-tpot-ms, or a request's own) and a step-time model:
- the token budget is what keeps the predicted step time under the tightest time-per-output-token target
  of the running requests (every running request gets one token per step, so a step's time is their TPOT);
- a waiting request is admitted only while the decode batch it joins is still predicted to meet that target,
  so past the knee requests wait (and are shed) instead of slowing everyone down;
- a queued request whose time-to-first-token target can no longer be met is shed, so no step is spent on a
  request that would be served uselessly late (it gets a clean 429).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable

from meshserve.config import SchedulerConfig
from meshserve.engine.sequence import Sequence, SequenceStatus
from meshserve.engine.step_time import StepShape, StepTimeModel

# Aim a little under the target: the model is a prediction, and a step's time varies.
TARGET_MARGIN = 0.9
# Tokens a step always gives to prefills already under way, so they finish even when decodes use the budget.
MIN_PREFILL_TOKENS = 16
# Admissions remembered to estimate the admission rate (the queue's drain rate).
_ADMISSION_WINDOW = 64


class SchedulingPolicy:
    """Per-step budgets and admission decisions for the Scheduler (see the module docstring)."""

    def __init__(self, config: SchedulerConfig, step_model: StepTimeModel | None = None):
        self.config = config
        self.step_model = step_model
        self._admissions: collections.deque[float] = collections.deque(maxlen=_ADMISSION_WINDOW)

    # -- targets ---------------------------------------------------------------------------------
    def ttft_target(self, seq: Sequence) -> float | None:
        return seq.slo_ttft_s if seq.slo_ttft_s is not None else self.config.slo_ttft_s

    def tpot_target(self, seqs: Iterable[Sequence]) -> float | None:
        """The tightest time-per-output-token target among seqs (None: nobody has one)."""
        targets = [s.slo_tpot_s if s.slo_tpot_s is not None else self.config.slo_tpot_s for s in seqs]
        targets = [t for t in targets if t is not None]
        return min(targets) if targets else None

    # -- budgets ---------------------------------------------------------------------------------
    def token_budget(self, running: list[Sequence]) -> int:
        """New tokens this step may compute."""
        static = self.config.max_num_batched_tokens
        target = self.tpot_target(running)
        if target is None or self.step_model is None:
            return static
        decodes = [s for s in running if s.num_tokens - s.num_computed_tokens <= 1]
        context = sum(s.num_tokens for s in decodes)
        extra = self.step_model.max_prefill_tokens(target * TARGET_MARGIN, len(decodes), context,
                                                   limit=static - len(decodes))
        return min(static, len(decodes) + max(extra, MIN_PREFILL_TOKENS))

    def may_admit(self, seq: Sequence, running: list[Sequence]) -> bool:
        """Whether seq may join the running batch: with it, a decode step still meets the TPOT target."""
        target = self.tpot_target([*running, seq])
        if target is None or self.step_model is None:
            return True
        num = len(running) + 1
        context = sum(s.num_tokens for s in running) + seq.num_tokens
        return self.step_model.predict(StepShape(num, num, context)) <= target * TARGET_MARGIN

    # -- the queue -------------------------------------------------------------------------------
    def prefill_time_s(self, num_tokens: int) -> float:
        """Predicted device time of a prefill of num_tokens tokens in chunks of the static budget."""
        if self.step_model is None or num_tokens <= 0:
            return 0.0
        chunk = self.config.max_num_batched_tokens
        full, rest = divmod(num_tokens, chunk)
        t = full * self.step_model.predict(StepShape(chunk, 1, chunk)) if full else 0.0
        return t + (self.step_model.predict(StepShape(rest, 1, num_tokens)) if rest else 0.0)

    def shed_late(self, waiting: Iterable[Sequence], now: float) -> list[Sequence]:
        """Queued, never-started requests that can no longer meet their time-to-first-token target: they have
        waited so long that even their own prefill, started now, would end past it."""
        if not self.config.slo_shed_late or self.step_model is None:
            return []
        per_token = None
        late = []
        for seq in waiting:
            target = self.ttft_target(seq)
            if target is None or seq.status != SequenceStatus.WAITING:
                continue
            if per_token is None:
                per_token = self.prefill_time_s(self.config.max_num_batched_tokens) / self.config.max_num_batched_tokens
            if now - seq.arrival_time + seq.num_prompt_tokens * per_token > target:
                late.append(seq)
        return late

    def record_admission(self, now: float | None = None) -> None:
        self._admissions.append(time.monotonic() if now is None else now)

    def admission_rate(self, now: float) -> float | None:
        """Requests admitted per second recently (None until there is a rate to speak of)."""
        recent = [t for t in self._admissions if now - t <= 10.0]
        if len(recent) < 2:
            return None
        span = max(now - recent[0], 1e-3)
        return len(recent) / span

    def queue_wait_s(self, waiting: list[Sequence], now: float) -> float:
        """Predicted wait of a request that joins the back of the queue now."""
        if not waiting:
            return 0.0
        rate = self.admission_rate(now)
        if rate is not None:
            return len(waiting) / rate
        return self.prefill_time_s(sum(s.num_prompt_tokens for s in waiting))
