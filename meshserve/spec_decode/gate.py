"""Whether speculating pays, from the measured acceptance and the step-time model.

A verify step scores k + 1 positions per sequence: nearly free while the batch is memory-bound, up to k + 1
times the work once it is compute-bound. With acceptance rate a per proposed token, a verify step yields
(1 - a^(k+1)) / (1 - a) tokens per sequence on average (the accepted run plus the target's own token), so
speculation pays when that many tokens per verify step's predicted time beat one token per plain step's.
The acceptance is a running average over recent verify rows; while speculation is off, one step in
`probe_every` still speculates so the average keeps up with the traffic.

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


def expected_tokens(acceptance: float, k: int) -> float:
    """Mean tokens a verify step yields per sequence at this per-token acceptance rate."""
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


class SpeculationGate:
    """Holds the running acceptance rate and decides, per step, whether to propose."""

    def __init__(self, k: int, step_model: StepTimeModel | None, margin: float = 0.03, probe_every: int = 16,
                 decay: float = 0.98, plain_refresh: int = 256):
        self.k = k
        self.step_model = step_model
        self.margin = margin  # speculate only when predicted to be at least this much faster
        self.probe_every = probe_every
        self.decay = decay
        self.acceptance = 1.0  # optimistic until measured
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
        gain = expected_tokens(self.acceptance, self.k)
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
        return expected_tokens(self.acceptance, self.k) / verify > (1.0 + self.margin) / floor

    def will_propose(self) -> bool:
        """A guess at the next decide() without changing state: on, or off with a probe due."""
        return self.is_on or (self._steps_off + 1) % self.probe_every == 0

    def decide(self, batch: int, context_tokens: int) -> bool:
        """This step's decision: pays(), and while off, a probe every probe_every steps; while on, a plain
        step when this batch's plain time is unmeasured or stale."""
        self.num_steps += 1
        self.last_batch = batch
        self.is_on = self.pays(batch, context_tokens)
        if self.is_on:
            self._steps_off = 0
            if (self.step_model is not None and self.measured.wants_plain(batch, self.num_steps, self.plain_refresh)
                    and not self._pays_against_floor(batch, context_tokens)):
                self.num_plain_probes += 1
                return False
            return True
        self._steps_off += 1
        return self._steps_off % self.probe_every == 0
