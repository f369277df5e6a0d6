"""Where each step's budget comes from: static limits, or service-level targets and a step-time model.

Without targets the budget is today's: max_num_batched_tokens tokens over at most max_num_seqs sequences
(with pipeline parallel: per step in flight, each over its share of the running ones; one_step_share).
With targets (the server's --slo-ttft-ms / --slo-tpot-ms, or a request's own) and a step-time model:
- every decoding request gets its token in every step, and prompts (chunks of running prefills, admissions)
  get at most slo_prefill_chunk tokens of the step beside them (1,024 by default: about two W3 prompts). Past
  the knee the queue is never empty, so every step is a mixed one; the cap sets their size: large enough to
  amortize a step's fixed cost (weights, KV reads, ~3 ms of a mixed step on the H200), small enough that no
  step holds several prompts' worth of work while every decoding request waits (in the simulator, W3 past the
  knee: 1,024 beats 512, 768, 1,280, 2,048 and no cap, tools/w3_slo_sim.py). Not a quantity of work: scaled
  by parameters (13,824 tokens for Qwen3-0.6B, whose prompts are ~13x cheaper) W3 on the H200 fell from 211-217
  to 60-81 req/s at QPS 384-512: steps grew to what the TPOT target allows (ITL p50 44-49 ms against 8.6-8.8),
  so most requests missed the 50 ms TPOT goal (2026-12-02, BENCHMARKS.md);
- within that, the step keeps the running requests' time per output token (TPOT, an average over their
  tokens) under the tightest target among them: every step that takes less than the target earns the
  difference as credit, and a step may take the target plus the credit earned, so prefill can come in a
  chunk now and then between plain decode steps rather than a dribble in every step;
- a waiting request is admitted only while the decode batch it joins is still predicted to meet that target,
  so past the knee requests wait (and are shed) instead of slowing everyone down;
- a queued request whose time-to-first-token target can no longer be met is shed, so no step is spent on a
  request that would be served uselessly late (it gets a clean 429).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass

from meshserve.config import SchedulerConfig
from meshserve.engine.sequence import Sequence, SequenceStatus
from meshserve.engine.step_time import StepShape, StepTimeModel

# Aim a little under the target: the model is a prediction, and a step's time varies.
TARGET_MARGIN = 0.9
# Most credit a run of short steps may save up for one long (prefill) step, in multiples of the TPOT target.
MAX_CREDIT_TARGETS = 3.0
# With requests decoding, prefill joins a step only in chunks at least this large (or what is left of it):
# a few hundred tokens in every step would turn every step into a slower mixed one.
MIN_PREFILL_CHUNK = 512
# Admissions remembered to estimate the admission rate (the queue's drain rate).
_ADMISSION_WINDOW = 64


@dataclass(frozen=True)
class StepBudget:
    """What one step may compute: new tokens in all, and of them at most prefill_tokens of prompts (prefill
    chunks of running requests and admissions); None: no separate cap (the plain token budget)."""

    tokens: int
    prefill_tokens: int | None = None


@dataclass
class RunningTally:
    """What may_admit reads of the running batch: its tightest TPOT target, its context tokens (num_tokens
    summed) and its size. Summed once a step and extended by each admission (SchedulingPolicy.admitted), so a
    step admitting many prompts does not walk the whole batch once per admission."""

    target: float | None
    context: int
    num_seqs: int


class SchedulingPolicy:
    """Per-step budgets and admission decisions for the Scheduler (see the module docstring)."""

    def __init__(self, config: SchedulerConfig, step_model: StepTimeModel | None = None):
        self.config = config
        self.step_model = step_model
        # (time, seconds since the previous admission) of admissions made while the queue was busy: the
        # service rate, not the arrival rate of a lightly loaded server (idle time would make it look slow)
        self._admissions: collections.deque[tuple[float, float]] = collections.deque(maxlen=_ADMISSION_WINDOW)
        self._last_admission: float | None = None
        self._last_admission_busy = False
        self.credit_s = 0.0  # step time saved under the TPOT target, which a longer step may spend

    # -- targets ---------------------------------------------------------------------------------
    def ttft_target(self, seq: Sequence) -> float | None:
        return seq.slo_ttft_s if seq.slo_ttft_s is not None else self.config.slo_ttft_s

    def tpot_target(self, seqs: Iterable[Sequence]) -> float | None:
        """The tightest time-per-output-token target among seqs (None: nobody has one)."""
        default, tightest = self.config.slo_tpot_s, None
        for s in seqs:  # one pass, no lists: this runs over the whole batch every step
            t = s.slo_tpot_s if s.slo_tpot_s is not None else default
            if t is not None and (tightest is None or t < tightest):
                tightest = t
        return tightest

    # -- budgets ---------------------------------------------------------------------------------
    def token_budget(self, running: list[Sequence], waiting: list[Sequence] | None = None) -> int:
        """New tokens this step may compute (waiting: the queue, or at least its head)."""
        return self.step_budget(running, waiting).tokens

    def step_budget(self, running: list[Sequence], waiting: list[Sequence] | None = None) -> StepBudget:
        """This step's budget (waiting: the queue, or at least its head). Without a TPOT target (or a model, or
        anyone decoding) it is the static one; with one, every decode gets its token and prompts get what keeps
        the step's predicted time under the target (plus credit), at most config.slo_prefill_chunk of them."""
        waiting = waiting or []
        static = self.config.max_num_batched_tokens
        target = self.tpot_target(running) if self.step_model is not None else None
        if target is None:
            return StepBudget(static)  # nobody's time per output token to protect
        # one pass over the batch (this runs every step): decodes, their context, and the prompt tokens left
        num_decodes = context = pending = 0
        for s in running:
            num_tokens = len(s.prompt_token_ids) + len(s.output_token_ids) + s.num_pending_tokens  # s.num_tokens
            left = num_tokens - s.num_computed_tokens
            if left <= 1:
                num_decodes += 1
                context += num_tokens
            else:
                pending += left
        if not num_decodes:
            return StepBudget(static)
        num_decodes, context = self.one_step_share(num_decodes, context)
        allowed = target * TARGET_MARGIN + self.credit_s  # below the target while repaying an overdraft
        limit = min(static - num_decodes, self.config.slo_prefill_chunk or static)
        extra = self.step_model.max_prefill_tokens(allowed, num_decodes, context, limit=limit)
        if MIN_PREFILL_CHUNK:
            pending += sum(s.num_prompt_tokens for s in waiting[:1])
            if extra < min(MIN_PREFILL_CHUNK, pending, limit):
                extra = 0  # decode only now (saving credit); prefill in a larger chunk a few steps later
        return StepBudget(num_decodes + extra, extra)

    def charge(self, scheduled_shape: StepShape, running: list[Sequence]) -> None:
        """Account a scheduled step against the TPOT target: a short step earns credit, a long one spends it."""
        target = self.tpot_target(running)
        if target is None or self.step_model is None or scheduled_shape.num_tokens == 0:
            self.credit_s = 0.0
            return
        earned = target * TARGET_MARGIN - self.step_model.predict(scheduled_shape)
        limit = MAX_CREDIT_TARGETS * target
        self.credit_s = min(max(self.credit_s + earned, -limit), limit)

    def one_step_share(self, num_seqs: int, context: int) -> tuple[int, int]:
        """Of num_seqs running sequences holding context tokens, those one step holds (and their context): all,
        or with pipeline parallel 1/pipeline_depth of them, at most max_num_seqs (Scheduler.schedule's share;
        up to SchedulerConfig.max_running run in all). Each step is over other sequences, so a sequence's next
        token comes pipeline_depth steps later, each a 1/pp slice of the layers per stage: with one step per
        stage that is one such step's predicted time, what the TPOT target bounds."""
        depth = self.config.pipeline_depth
        if depth <= 1 or num_seqs == 0:
            return num_seqs, context
        share = min(-(-num_seqs // depth), self.config.max_num_seqs)
        return share, context * share // num_seqs

    def may_admit(self, seq: Sequence, running: list[Sequence], tally: RunningTally | None = None) -> bool:
        """Whether seq may join the running batch: with it, a decode step still meets the TPOT target. tally:
        running_tally(running), kept up to date by admitted (the scheduler's admissions in one step); without
        it the batch is walked here. An empty batch always admits: running alone is the best any target can
        get, and waiting would not change it (a target under one sequence's step, the request's own or
        --slo-tpot-ms, stalled the whole queue behind it)."""
        if self.step_model is None:
            return True
        if tally is None:
            tally = self.running_tally(running)
        if tally.num_seqs == 0:
            return True
        target, own = tally.target, self.tpot_target((seq,))  # the tightest of both (no list copy)
        if own is not None and (target is None or own < target):
            target = own
        if target is None:
            return True
        num, context = self.one_step_share(tally.num_seqs + 1, tally.context + seq.num_tokens)
        return self.step_model.predict(StepShape(num, num, context)) <= target * TARGET_MARGIN

    def running_tally(self, running: list[Sequence]) -> RunningTally | None:
        """may_admit's pass over the running batch (None without a step model: may_admit reads nothing)."""
        if self.step_model is None:
            return None
        context = 0
        for s in running:  # seq.num_tokens summed without the property
            context += len(s.prompt_token_ids) + len(s.output_token_ids) + s.num_pending_tokens
        return RunningTally(self.tpot_target(running), context, len(running))

    def admitted(self, tally: RunningTally | None, seq: Sequence) -> None:
        """seq joined the running batch tally describes (nothing else changed it): the tally now includes it. Run
        alone, a request whose own TPOT target even that misses drops it (the server's, if any, applies), so it
        does not hold later admissions to what no batch can meet."""
        if tally is None:
            return
        if (tally.num_seqs == 0 and seq.slo_tpot_s is not None
                and self.step_model.predict(StepShape(1, 1, seq.num_tokens)) > seq.slo_tpot_s * TARGET_MARGIN):
            seq.slo_tpot_s = None
        own = self.tpot_target((seq,))
        if own is not None and (tally.target is None or own < tally.target):
            tally.target = own
        tally.context += seq.num_tokens
        tally.num_seqs += 1

    # -- the queue -------------------------------------------------------------------------------
    def prefill_time_s(self, num_tokens: int) -> float:
        """Predicted device time of a prefill of num_tokens tokens in chunks of the static budget."""
        if self.step_model is None or num_tokens <= 0:
            return 0.0
        chunk = self.config.max_num_batched_tokens
        full, rest = divmod(num_tokens, chunk)
        t = full * self.step_model.predict(StepShape(chunk, 1, chunk)) if full else 0.0
        return t + (self.step_model.predict(StepShape(rest, 1, num_tokens)) if rest else 0.0)

    def prefill_range_s(self, start: int, end: int) -> float | None:
        """Predicted device time to prefill a sequence's tokens start..end-1 with the first start cached, in
        chunks of the static budget whose attention reads everything before them; None without a model."""
        if self.step_model is None:
            return None
        chunk = self.config.max_num_batched_tokens
        t = 0.0
        for a in range(start, end, chunk):
            b = min(a + chunk, end)
            t += self.step_model.predict(StepShape(b - a, 1, b))
        return t

    def shed_late(self, waiting: Iterable[Sequence], now: float) -> list[Sequence]:
        """Queued, never-started requests that can no longer meet their time-to-first-token target: what they
        have waited, plus the wait for the requests ahead of them at the recent admission rate, plus their own
        prefill, ends past it. Serving them would spend steps on requests that count for nobody; dropping them
        early leaves the steps to requests behind them that can still make it."""
        if not self.config.slo_shed_late or self.step_model is None:
            return []
        per_token = None
        rate = self.admission_rate(now)
        late = []
        for position, seq in enumerate(waiting):
            target = self.ttft_target(seq)
            # a sequence holding output tokens already answered (e.g. a disaggregated consumer's, admitted with
            # the producer's first token): its TTFT is behind it, dropping it would only lose the work
            if target is None or seq.status != SequenceStatus.WAITING or seq.output_token_ids:
                continue
            if per_token is None:
                per_token = self.prefill_time_s(self.config.max_num_batched_tokens) / self.config.max_num_batched_tokens
            ahead_s = position / rate if rate else 0.0
            if now - seq.arrival_time + ahead_s + seq.num_prompt_tokens * per_token > target:
                late.append(seq)
        return late

    def record_admission(self, now: float | None = None, queue_behind: bool = True) -> None:
        """A request left the queue; queue_behind: others were still waiting (the admission was limited by
        the server, not by arrivals). Only gaps between two such admissions measure the service rate."""
        t = time.monotonic() if now is None else now
        if queue_behind and self._last_admission_busy and self._last_admission is not None:
            self._admissions.append((t, t - self._last_admission))
        self._last_admission, self._last_admission_busy = t, queue_behind

    def admission_rate(self, now: float) -> float | None:
        """Requests admitted per second while the queue was busy, over the last 10 s (None until there is a
        rate to speak of)."""
        recent = [gap for t, gap in self._admissions if now - t <= 10.0]
        if len(recent) < 2:
            return None
        return len(recent) / max(sum(recent), 1e-3)

    def queue_wait_s(self, waiting: list[Sequence], now: float) -> float:
        """Predicted wait of a request that joins the back of the queue now."""
        if not waiting:
            return 0.0
        rate = self.admission_rate(now)
        if rate is not None:
            return len(waiting) / rate
        return self.prefill_time_s(sum(s.num_prompt_tokens for s in waiting))
