"""The engine core's side of speculative decoding: which sequences get proposals for their next step,
where the proposals come from (the n-gram proposer here, or a draft model's on the ranks), and the counts."""

from __future__ import annotations

from meshserve.engine.runner_output import ModelRunnerOutput
from meshserve.engine.scheduler_output import SchedulerOutput
from meshserve.engine.sequence import Sequence
from meshserve.spec_decode.config import SpeculativeConfig
from meshserve.spec_decode.gate import SpeculationGate
from meshserve.spec_decode.ngram_proposer import NgramProposer
from meshserve.spec_decode.stats import SpecDecodeStats


def speculation_allowed(seq: Sequence) -> bool:
    """Whether seq's next tokens may be verified several at a time: settings that read each position's
    history or report on it (logprobs, penalties, logit bias, allowed ids and bad words, grammars, min_tokens
    still banning stop tokens) decode one token per step instead."""
    p = seq.params
    return (
        p.logprobs is None
        and not p.uses_penalties
        and not p.logit_bias
        and not p.uses_token_masks
        and seq.grammar is None
        and not p.uses_grammar
        and seq.num_output_tokens >= p.min_tokens
    )


class Speculator:
    """Sets each sequence's spec_token_ids after a step and counts acceptance.

    Speculation pauses (no proposals) while more than disable_by_batch_size sequences run, and while the
    measured acceptance says it does not pay at this batch (gate.py: the step-time model's verify step vs
    plain step, probing now and then): a compute-bound batch verifying rejected tokens loses throughput.
    """

    def __init__(self, config: SpeculativeConfig, step_model=None):
        self.config = config
        self.gate = SpeculationGate(config.num_speculative_tokens, step_model)
        # a host-side proposer (propose_for(seq, skip) -> list[int]); None: proposals come from the ranks
        self.proposer = (
            NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
            if config.method == "ngram"
            else None
        )
        self.stats = SpecDecodeStats()
        # async scheduling: proposals for a sequence with a step in flight follow that step's tokens (as if
        # its proposals are all accepted); False: such a sequence gets none (its next step waits instead)
        self.propose_ahead = False

    @staticmethod
    def _skip(seq: Sequence, runner_out: ModelRunnerOutput) -> int:
        """Tokens of the step in flight that the next proposals skip: all of them (its proposals accepted)
        while its proposals were made on what this step turned out to accept; else its first (its
        proposals, made on a wrong guess, will most likely be rejected: the target's own token is next)."""
        tokens = runner_out.spec_token_ids.get(seq.seq_id)
        accepted = len(tokens) - 1 if tokens else 0
        return seq.num_pending_tokens if seq.spec_assumed_accepted in (-1, accepted) else 1

    def may_propose(self, sampling: list[Sequence], num_running: int) -> bool:
        """Whether after_step may give any of `sampling` (the sequences sampling in the step in flight)
        proposals: async scheduling waits for that step then, else schedules the next one ahead. Predicted
        without changing the gate; when the gate turns on unforeseen, the proposals of sequences with a step
        in flight are dropped (after_step) and the step after waits."""
        limit = self.config.disable_by_batch_size
        if limit is not None and num_running > limit:
            return False
        gate_on = self.gate.will_propose()
        return any(speculation_allowed(seq) and (gate_on or seq.params.seed is not None) for seq in sampling)

    def after_step(
        self,
        sched_out: SchedulerOutput,
        runner_out: ModelRunnerOutput,
        updated: list[Sequence],
        num_running: int,
    ) -> None:
        for entry in sched_out.scheduled:
            tokens = runner_out.spec_token_ids.get(entry.seq_id)
            if entry.num_spec_tokens and tokens:
                self.stats.observe(entry.num_spec_tokens, len(tokens) - 1)
                self.gate.observe(entry.num_spec_tokens, len(tokens) - 1)
        decode_only = bool(sched_out.scheduled) and all(
            e.num_new_tokens == 1 + e.num_spec_tokens and e.num_computed_tokens >= e.num_prompt_tokens
            for e in sched_out.scheduled)
        num_verifying = sum(1 for e in sched_out.scheduled if e.num_spec_tokens)
        # the gate compares measured verify and plain steps: a prefill chunk, or a step where only some rows
        # verify (a partial probe), would blur them
        if decode_only and num_verifying in (0, len(sched_out.scheduled)):
            self.gate.observe_step(len(sched_out.scheduled), num_verifying > 0, runner_out.device_time_s)
        limit = self.config.disable_by_batch_size
        paused = limit is not None and num_running > limit
        # the gate learns from traffic, so it spares seeded requests: a seed gives the same tokens each time
        # (speculative and plain sampling draw their random numbers differently)
        gated = not paused and bool(updated) and not self.gate.decide(num_running,
                                                                      sum(seq.num_tokens for seq in updated))
        # a probe while off at a large batch: one sequence in `stride` proposes (rotating), enough to measure
        stride = self.gate.probe_stride(num_running) if not gated and not paused and updated else 1
        for i, seq in enumerate(updated):
            # a sequence with a step in flight (async scheduling) has its next inputs placed already: its
            # proposals skip that step's tokens (propose_ahead), or it gets none
            pending = seq.num_pending_tokens
            seq.spec_offset = pending
            skip = self._skip(seq, runner_out) if pending else 0
            seq.spec_assumed_accepted = skip - 1
            if (seq.is_finished or paused or (pending and not self.propose_ahead) or not speculation_allowed(seq)
                    or ((gated or (i + self.gate.num_probes) % stride) and seq.params.seed is None)):
                seq.spec_token_ids = []
            elif self.proposer is not None:
                seq.spec_token_ids = self.proposer.propose_for(seq, skip)
            else:
                seq.spec_token_ids = runner_out.draft_token_ids.get(seq.seq_id, [])
