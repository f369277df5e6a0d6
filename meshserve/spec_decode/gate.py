"""Whether speculating pays, from the measured acceptance and the step-time model.

A verify step scores k + 1 positions per sequence: nearly free while the batch is memory-bound, up to k + 1
times the work once it is compute-bound. The acceptance a is the share of proposed tokens accepted (what
observe() averages, as the stats' acceptance rate), so a verify row of p proposals (a running mean: an n-gram
match may propose fewer than k) yields 1 + a p tokens on average (its accepted run plus the target's own
token: the stats' mean accepted length), and speculation pays
when that many tokens per verify step's time beat one token per plain step's. (The geometric
(1 - a^(k+1)) / (1 - a) holds for a per-position acceptance probability, not for this share: fed the share it
gave 1.36 tokens at the H200's batch-64 share 0.26 with k = 4, where the rows made 2.05, and turned
speculation off at share 0.58, 3.33 tokens a step, where it paid.)
The acceptance is a running average over recent verify rows; while speculation is off, a probe step still
speculates so the average keeps up with the traffic: `probe_every` steps after turning off, then twice as
far apart each time a probe finds it still does not pay (up to `max_probe_every`). At a batch of
PARTIAL_PROBE_BATCH or more, a probe speculates on one sequence in PROBE_STRIDE only (enough rows for the
acceptance), unless this batch's verify step time is unmeasured or stale: a batch-64 verify step of k = 4
took ~3x a plain step on the H200, so each full probe at acceptance 0.26 cost about one plain step, and 16
of them in 256 steps made the run 0.95x (issue 22, 2026-12-01).

The engine times its steps (observe_step): once a batch size has measured verify and plain steps
(measured_steps.py), their ratio decides instead of the model, which misses what skinny GEMMs of k + 1 rows
per sequence really cost. While speculating, a step now and then runs plain to measure the plain side (twice
when a batch size is first seen, then once per `plain_refresh` steps), unless the measured verify step pays
even against the fastest plain step there can be (every weight and KV byte read at the data sheet's
bandwidth): then no plain step is spent (batch 1 at high acceptance).
"""

from __future__ import annotations

from meshserve.engine.step_time import StepShape, StepTimeModel
from meshserve.spec_decode.measured_steps import MeasuredSteps

# verify rows measured before the gate may turn speculation off (it starts on)
WARMUP_DRAFTS = 32
# batches from this size on probe with a share of their sequences (a verify row costs real time there)
PARTIAL_PROBE_BATCH = 16
# ... one sequence in this many
PROBE_STRIDE = 8


def expected_tokens(acceptance: float, k: float) -> float:
    """Mean tokens a verify row of k proposals (a mean, for rows of varying length) yields when this share of
    proposed tokens is accepted."""
    return 1.0 + min(max(acceptance, 0.0), 1.0) * k


class SpeculationGate:
    """Holds the running acceptance rate and decides, per step, whether to propose."""

    def __init__(self, k: int, step_model: StepTimeModel | None, margin: float = 0.03, probe_every: int = 16,
                 decay: float = 0.98, plain_refresh: int = 256, max_probe_every: int = 64):
        self.k = k
        self.step_model = step_model
        self.margin = margin  # speculate only when predicted to be at least this much faster
        self.probe_every = probe_every
        self.max_probe_every = max(max_probe_every, probe_every)
        self._probe_interval = probe_every  # steps from the last probe (or turning off) to the next
        self.num_probes = 0  # steps that speculated while off
        self.decay = decay
        self.acceptance = 1.0  # optimistic until measured
        self.proposed = float(k)  # running mean of proposals per verify row (an n-gram match may give fewer)
        self.num_drafts = 0
        self._steps_off = 0
        self.is_on = True
        self.measured = MeasuredSteps()
        self.plain_refresh = plain_refresh
        self.num_steps = 0  # decide() calls: the clock of the measurements' age
        self.num_plain_probes = 0
        self.last_batch = 0  # the batch of the latest decide(), for reports

    def observe(self, num_proposed: int, num_accepted: int) -> None:
        """One verify row: of num_proposed tokens, num_accepted were kept."""
        if num_proposed <= 0:
            return
        self.num_drafts += 1
        rate = num_accepted / num_proposed
        w = 1.0 / self.num_drafts if self.num_drafts < 1.0 / (1.0 - self.decay) else 1.0 - self.decay
        self.acceptance += w * (rate - self.acceptance)
        self.proposed += w * (num_proposed - self.proposed)

    def observe_step(self, batch: int, verify: bool, device_time_s: float) -> None:
        """One measured decode step over `batch` sequences (no prefill in it): with proposals or without."""
        self.measured.add(batch, verify, device_time_s, self.num_steps)

    def pays(self, batch: int, context_tokens: int) -> bool:
        """Whether a step over `batch` sequences reading `context_tokens` of KV is faster per token with
        proposals: by the measured verify and plain steps at this batch where both are, else predicted by the
        step-time model; True until enough rows are measured, or without a step-time model (the switch that
        keeps speculation on whatever it costs)."""
        if self.step_model is None or self.num_drafts < WARMUP_DRAFTS or batch == 0:
            return True
        gain = expected_tokens(self.acceptance, self.proposed)
        measured = self.measured.times(batch)
        if measured is not None:
            plain, verify = measured
            return gain / verify > (1.0 + self.margin) / plain
        if self._pays_against_floor(batch, context_tokens):
            return True
        plain = self.step_model.predict(StepShape(batch, batch, context_tokens))
        verify = self.step_model.predict(StepShape(batch * (self.k + 1), batch, context_tokens + batch * self.k))
        if plain <= 0.0 or verify <= 0.0:
            return True
        return gain / verify > (1.0 + self.margin) / plain

    def _pays_against_floor(self, batch: int, context_tokens: int) -> bool:
        """Whether the measured verify step at this batch beats even a plain step at the bandwidth floor."""
        verify = self.measured.verify_seconds(batch)
        floor = self.step_model.floor(StepShape(batch, batch, context_tokens))
        if verify is None or floor <= 0.0:
            return False
        return expected_tokens(self.acceptance, self.proposed) / verify > (1.0 + self.margin) / floor

    def will_propose(self) -> bool:
        """A guess at the next decide() without changing state: on, or off with a probe due."""
        return self.is_on or self._steps_off + 1 >= self._probe_interval

    def decide(self, batch: int, context_tokens: int) -> bool:
        """This step's decision: pays(), and while off, a probe after _probe_interval steps (doubling while
        probes find it still off); while on, a plain step when this batch's plain time is unmeasured or
        stale."""
        self.num_steps += 1
        self.last_batch = batch
        self.is_on = self.pays(batch, context_tokens)
        if self.is_on:
            self._steps_off = 0
            self._probe_interval = self.probe_every
            if (self.step_model is not None and self.measured.wants_plain(batch, self.num_steps, self.plain_refresh)
                    and not self._pays_against_floor(batch, context_tokens)):
                self.num_plain_probes += 1
                return False
            return True
        self._steps_off += 1
        if self._steps_off < self._probe_interval:
            return False
        self._steps_off = 0
        self._probe_interval = min(2 * self._probe_interval, self.max_probe_every)
        self.num_probes += 1
        return True

    def probe_stride(self, batch: int) -> int:
        """After decide() returned True: every how many-th sequence of the batch proposes. 1 (all) while on,
        at small batches, and while this batch's verify step time needs (re)measuring; else PROBE_STRIDE."""
        if self.is_on or batch < PARTIAL_PROBE_BATCH or self.measured.wants_verify(batch, self.num_steps,
                                                                                      self.plain_refresh):
            return 1
        return PROBE_STRIDE
