"""Continuous batching with chunked prefill and recompute preemption.

Each step spends a token budget (max_num_batched_tokens) over at most max_num_seqs sequences: first the
running ones (decodes, and the next chunk of partially prefilled prompts), then waiting ones in arrival
order. When the KV pool runs dry, the most recently admitted running sequence is preempted: its blocks
are freed and it goes back to the front of the queue to be recomputed later; its tokens are kept, so its
output is unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from meshserve.config import CacheConfig, SchedulerConfig
from meshserve.engine.block_manager import BlockManager
from meshserve.engine.request_fit import check_request_fits
from meshserve.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from meshserve.engine.scheduling_policy import SchedulingPolicy
from meshserve.engine.sequence import Sequence, SequenceStatus
from meshserve.engine.step_time import StepShape
from meshserve.engine.waiting_queue import WaitingQueue

logger = logging.getLogger(__name__)


class Scheduler:
    """Decides each step's batch: which sequences run and how many of their tokens, within the token and
    sequence budgets, allocating KV blocks through its BlockManager and preempting when they run out.

    It owns the waiting queue and the running list; `schedule()` returns a SchedulerOutput and
    `update_after_step()` applies the sampled tokens, with the token-level stops (stop token ids,
    max_tokens, max_model_len). Text-level stops are the front end's, which calls `finish()`. The per-step
    budget and admission come from its SchedulingPolicy (static limits, or service-level targets).
    """

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig):
        self.config = scheduler_config
        self.block_size = cache_config.block_size
        self.block_manager = BlockManager(cache_config.num_blocks, cache_config.block_size,
                                          cache_config.enable_prefix_caching)
        self.policy = SchedulingPolicy(scheduler_config)
        self.waiting = WaitingQueue(by_priority=scheduler_config.scheduling_policy == "priority")
        self.running: list[Sequence] = []
        self.shed: list[Sequence] = []  # queued requests dropped as too late for their TTFT target (unreported)
        self.seqs: dict[str, Sequence] = {}
        self._finished_since_last_step: list[str] = []
        self.num_preemptions = 0
        # async scheduling: a step's tokens count as computed (and its samples as pending) when it is
        # scheduled, so the next step can be scheduled before this one's results are back
        self.async_mode = False
        # pipeline parallel: several steps in flight at once; a sequence waits until its last step is back
        # (its next input token is sampled on the last stage, far from the first)
        self.skip_pending = False
        # how many steps are in flight is config.pipeline_depth: each takes at most its share of the running
        # sequences, so the stages' steps stay even (otherwise one step can hold the whole batch and the next
        # nothing), and each is a batch of up to max_num_seqs of its own (max_running)
        # pipeline parallel with the token hand-off (pipeline_stage.TokenHandoff): a sequence whose only pending
        # token was sampled exactly handoff_lag steps ago may run again (the first stage reads that token from
        # the last stage's samples on the device); steps are counted as the runners count them (non-empty ones)
        self.handoff_lag = 0
        # whether the grammar matchers see the sampled tokens (False: MESHSERVE_GRAMMAR_PROBE, a cost probe)
        self.grammar_accepts = True
        self._step_index = 0
        self._sampled_at: dict[str, int] = {}  # sequence -> the step it last sampled in (with the hand-off)
        # where "now" comes from: the wall clock, or a simulated one (meshserve/simulator drives this scheduler)
        self.clock = time.monotonic
        # speculative decoding with a draft model: KV slots its proposals take past each step's tokens
        self.num_lookahead_tokens = 0
        # async scheduling with speculation: a sequence may verify proposals with a step of its own still in
        # flight (a verify step's tokens count as pending as if all were accepted; the runner moves the next
        # chunk back by the rejected ones, update_after_step does the same here)
        self.verify_ahead = False
        # prefill/decode disaggregation (disagg/coordinator.py): told of each finish; True when it keeps the
        # sequence's blocks for a KV transfer (they are not freed here)
        self.kv_hold: Callable[[Sequence, SequenceStatus], bool] | None = None
        # told of each preemption, once the sequence's blocks are released (they may be reused at once): a
        # layer-wise KV producer must not send them as the sequence's any more (disagg/layer_hook.py)
        self.kv_preempted: Callable[[Sequence], None] | None = None
        # KV offload: stores start for a step's worth of blocks next in eviction order (block_manager.py)
        self.block_manager.store_ahead_blocks = (self.block_manager.blocks_needed(scheduler_config.max_num_batched_tokens)
                                                 + scheduler_config.max_num_seqs)
        # KV offload: restore a prefix from disk only when reading it beats recomputing it (the step-time model)
        self.block_manager.prefill_range_s = self.policy.prefill_range_s

    # -- admission -------------------------------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Reject a request that could never run: too long for the model or for the whole KV pool. A draft
        model's lookahead slots count against the pool: a request that fills it without them would preempt
        itself at its last steps, and recompute, forever."""
        capacity = self.block_manager.num_blocks * self.block_size - self.num_lookahead_tokens
        check_request_fits(num_prompt_tokens, max_tokens, max_model_len=self.config.max_model_len,
                           capacity_tokens=capacity,
                           enable_chunked_prefill=self.config.enable_chunked_prefill,
                           max_num_batched_tokens=self.config.max_num_batched_tokens)

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq.num_prompt_tokens, seq.max_tokens)
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def max_running(self) -> int:
        """Sequences that may run at once: max_num_seqs per step in flight. With pipeline parallel each of the
        pipeline_depth steps in flight is over other sequences and holds up to max_num_seqs of them, so every
        stage's step is as large as one device's (vLLM v0's one scheduler per virtual engine). Their KV shares
        one pool (a stage holds 1/pp of the layers: PP = 2 has twice one device's blocks) and preemption takes
        the newest running sequence as before, in a step in flight or not (its token is kept; it rejoins once
        that is back). From the config (SchedulerConfig.max_running), as the planner and simulator read it."""
        return self.config.max_running

    # -- one step --------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        # swap (KV offload's preemption mode): its KV waits in the CPU tier and its computed tokens stand
        # auto mode weighs the swap against recomputing its tokens, each chunk's attention over those before it
        recompute_s = lambda: self.policy.prefill_range_s(0, seq.num_computed_tokens) or 0.0  # noqa: E731
        if not self.block_manager.swap_out(seq, recompute_s):
            self.block_manager.free(seq)
            seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        if self.kv_preempted is not None:
            self.kv_preempted(seq)
        seq.spec_token_ids = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        logger.debug("preempted %s (%d tokens) to free KV blocks", seq.seq_id, seq.num_tokens)

    def _entry(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        # one per scheduled row and step: the sequence's lengths are read once here, not through its properties
        start, end, params = seq.num_computed_tokens, seq.num_computed_tokens + num_new, seq.params
        num_prompt, pending = len(seq.prompt_token_ids), seq.num_pending_tokens
        num_output = len(seq.output_token_ids) + pending  # with the pending ones: the index of the token sampled
        num_tokens = num_prompt + num_output
        num_spec = max(0, end - num_tokens)  # proposals scheduled after the last token
        do_sample = end >= num_tokens
        needs_history = do_sample and params.reads_output_history
        # prompt logprobs score each prompt token from the position before it, across chunk borders
        needs_prompt = needs_history or (params.prompt_logprobs is not None and start < num_prompt)
        token_ids = seq.token_ids_slice(start, end - num_spec)
        # positional, in the fields' order: half the cost of the same call by keywords (~0.3 us a row)
        return ScheduledSequence(
            seq.seq_id,  # seq_id
            token_ids + seq.spec_token_ids[:num_spec] if num_spec else token_ids,  # token_ids
            start,  # num_computed_tokens
            self.block_manager.block_table(seq),  # block_table
            params,  # params
            do_sample,  # do_sample
            seq.prompt_token_ids if needs_prompt else None,  # prompt_token_ids
            seq.output_token_ids if needs_history else None,  # output_token_ids
            num_prompt,  # num_prompt_tokens
            num_output,  # num_output_tokens
            num_spec,  # num_spec_tokens
            max(0, pending - 1) if self.verify_ahead else 0,  # num_unverified_tokens
        )

    def _shed_late(self, now: float) -> None:
        for seq in self.policy.shed_late(self.waiting, now):
            self.finish(seq, SequenceStatus.FINISHED_ABORTED)
            self.shed.append(seq)

    def _pick_victim(self, first: int) -> Sequence:
        """The running sequence to preempt among those not yet scheduled this step (running[first:]): the
        newest, or under the priority policy the least urgent."""
        if not self.waiting.by_priority:
            return self.running.pop()
        victim = max(self.running[first:], key=lambda s: (s.priority, s.arrival_time))
        self.running.remove(victim)
        return victim

    def _poll_offload(self) -> None:
        # KV offload: blocks whose stores finished become allocatable; a swapped sequence whose KV store failed
        # recomputes instead (nothing waits on a copy that will never come)
        for seq_id in self.block_manager.poll_offload():
            seq = self.seqs.get(seq_id)
            if seq is not None:
                seq.num_computed_tokens = 0

    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        self._poll_offload()
        self._shed_late(now)
        step_budget = self.policy.step_budget(self.running, [self.waiting[0]] if self.waiting else [])
        budget = step_budget.tokens
        # prompt tokens (running prefills, admissions) this step may take: the policy's cap keeps each decode's
        # token in the step, wherever its sequence sits in the running list
        prefill_left = budget if step_budget.prefill_tokens is None else step_budget.prefill_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[str] = []

        # 1. running sequences, oldest first; preempt from the newest end when blocks run out
        groups = self.handoff_lag or self.config.pipeline_depth  # the steps a sequence's turns come round in
        share = min(-(-len(self.running) // groups), self.config.max_num_seqs) if groups > 1 else len(self.running)
        i = 0
        stalled = False  # blocks are coming free as their stores finish: wait for them rather than preempt
        # locals for what every row reads (running is the same list object throughout: preemption pops from it)
        running, skip_pending, allocate = self.running, self.skip_pending, self.block_manager.allocate
        while i < len(running) and budget > 0 and len(scheduled) < share:
            seq = running[i]
            pending = seq.num_pending_tokens
            if pending and ((skip_pending and not self._handed_off(seq)) or self._reached_limit(seq)):
                i += 1  # its last token is on its way; nothing more to compute
                continue
            # seq.num_tokens, read without the property (every running sequence, every step)
            num_new = min(len(seq.prompt_token_ids) + len(seq.output_token_ids) + pending - seq.num_computed_tokens,
                          budget)
            is_prefill = num_new > 1 and not seq.spec_token_ids
            if is_prefill:
                num_new = min(num_new, prefill_left)
                if num_new <= 0:
                    i += 1  # a prompt chunk over this step's prefill cap: next step
                    continue
            if (seq.spec_token_ids and seq.spec_offset == seq.num_pending_tokens
                    and (self.verify_ahead or not seq.num_pending_tokens)
                    and num_new == seq.num_tokens - seq.num_computed_tokens):
                num_new += self._num_spec_to_verify(seq, budget - num_new)
            while not allocate(seq, num_new, None, self.num_lookahead_tokens):
                if self.block_manager.num_landing_blocks:
                    stalled = True
                    break
                victim = self._pick_victim(i)
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            else:
                scheduled.append((seq, num_new))
                budget -= num_new
                prefill_left -= num_new if is_prefill else 0
                i += 1
            if stalled:
                break

        # 2. waiting sequences in order, unless this step already had to preempt (or wait for blocks). What the
        # policy reads of the running batch is tallied at the first candidate, then extended by each admission
        # (many a step when prompts are short beside the token budget): running only grows by them from here
        tally = None
        while (self.waiting and not preempted and not stalled and min(budget, prefill_left) > 0
               and len(self.running) < self.max_running and len(scheduled) < self.config.max_num_seqs):
            seq = self.waiting[0]
            if seq.num_pending_tokens:
                break  # preempted while its last step ran: recompute once that token is known
            if tally is None:  # (stays None without a step model: may_admit reads nothing then)
                tally = self.policy.running_tally(self.running)
            if not self.policy.may_admit(seq, self.running, tally):
                break  # one more in the batch would break the time-per-output-token target
            cached = self.block_manager.find_cached_prefix(seq) if seq.num_computed_tokens == 0 else []
            if cached is None:
                break  # its prefix is being read from disk (off this thread): admitted once it is in memory
            num_hit = len(cached) * self.block_size
            num_new = seq.num_tokens - seq.num_computed_tokens - num_hit
            room = min(budget, prefill_left)
            if num_new > room and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, room)
            if not self.block_manager.allocate(seq, num_new, cached, self.num_lookahead_tokens):
                break
            self.waiting.popleft()
            if seq.status == SequenceStatus.WAITING:  # first admission, not a recompute
                seq.num_cached_tokens = num_hit
                self.block_manager.record_admission(seq, num_hit)
                self.policy.record_admission(now, queue_behind=bool(self.waiting))
            seq.num_computed_tokens += num_hit
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.policy.admitted(tally, seq)
            scheduled.append((seq, num_new))
            budget -= num_new
            prefill_left -= num_new

        out = SchedulerOutput(
            scheduled=[self._entry(seq, n) for seq, n in scheduled],
            preempted_seq_ids=preempted,
            finished_seq_ids=self._finished_since_last_step,
        )
        self._finished_since_last_step = []
        if self.handoff_lag and out.scheduled:
            self._sampled_at.update((e.seq_id, self._step_index) for e in out.scheduled if e.do_sample)
            self._step_index += 1
        if self.block_manager.offload is not None:  # copies between KV tiers (launched even with nothing to run)
            out.kv_transfers, out.kv_stores_after_forward = self.block_manager.take_step_transfers()
        out.shape = StepShape.of(out.scheduled)
        self.policy.charge(out.shape, self.running)
        if self.async_mode:
            for (seq, n), entry in zip(scheduled, out.scheduled):
                seq.num_computed_tokens += n
                seq.num_pending_tokens += entry.do_sample + entry.num_spec_tokens  # all accepted, for now
        return out

    def _num_spec_to_verify(self, seq: Sequence, budget: int) -> int:
        """How many of seq's proposals fit this step: the token budget, and no more than max_tokens and
        max_model_len leave room for (accepted proposals plus the target's own token)."""
        room = min(seq.max_tokens - seq.num_output_tokens - seq.num_pending_tokens,
                   self.config.max_model_len - seq.num_tokens) - 1
        return max(0, min(len(seq.spec_token_ids), budget, room))

    def _handed_off(self, seq: Sequence) -> bool:
        """Whether seq's pending token reaches the first stage on the device in time for this step: its only one,
        sampled handoff_lag steps ago (and nothing on the host needs it first: penalties, grammars, proposals)."""
        return (self.handoff_lag > 0 and seq.num_pending_tokens == 1
                and self._sampled_at.get(seq.seq_id) == self._step_index - self.handoff_lag
                and not seq.params.reads_output_history and seq.grammar is None and not seq.spec_token_ids)

    def _reached_limit(self, seq: Sequence) -> bool:
        """No token after the pending ones may be scheduled: max_tokens or max_model_len is reached."""
        num_output = len(seq.output_token_ids) + seq.num_pending_tokens  # (lengths, not properties: every step)
        return num_output >= seq.max_tokens or len(seq.prompt_token_ids) + num_output >= self.config.max_model_len

    @property
    def needs_known_history(self) -> bool:
        """Whether a running sequence's next step needs every token known (penalties and bad words read the
        history; a grammar's next mask depends on the last token)."""
        return any(seq.params.reads_output_history or seq.grammar is not None for seq in self.running)

    def update_after_step(self, output: SchedulerOutput, sampled: dict[str, int],
                          spec_sampled: dict[str, list[int]] | None = None) -> list[Sequence]:
        """Advance computed tokens (async mode: done at scheduling), append sampled tokens, apply
        token-level stops. Returns the sequences that got a new token this step (finished ones included);
        a sequence that finished meanwhile (stop, abort) drops its token. spec_sampled holds the tokens of
        sequences that verified proposals (see _update_speculative).
        """
        updated = []
        seqs, async_mode = self.seqs, self.async_mode  # (locals, and status.finished for is_finished: every row)
        for entry in output.scheduled:
            seq = seqs.get(entry.seq_id)
            if seq is None or seq.status.finished:
                continue
            if entry.num_spec_tokens:
                tokens = (spec_sampled or {}).get(entry.seq_id)
                if tokens and self._update_speculative(seq, entry, tokens):
                    updated.append(seq)
                continue
            seq.num_step_tokens = 1
            if not async_mode:
                seq.num_computed_tokens += entry.num_new_tokens
            elif entry.do_sample:
                seq.num_pending_tokens -= 1
            token = sampled.get(entry.seq_id)
            if token is None:
                continue
            seq.output_token_ids.append(token)
            self._check_token_stop(seq, token)
            if seq.grammar is not None and not seq.status.finished:
                self._advance_grammar(seq, token)
            updated.append(seq)
        return updated

    def _update_speculative(self, seq: Sequence, entry, tokens: list[int]) -> bool:
        """Append a verify step's tokens (accepted proposals, then the target's own) one by one with the
        token-level stops, so a stop inside an accepted run truncates it; roll back the KV of the rejected
        proposals (their blocks return to the pool). Returns whether any token was appended."""
        seq.spec_token_ids = []
        seq.num_step_tokens = 0
        for token in tokens:
            seq.output_token_ids.append(token)
            seq.num_step_tokens += 1
            self._check_token_stop(seq, token)
            if seq.grammar is not None and not seq.is_finished:
                self._advance_grammar(seq, token)
            if seq.is_finished:
                break
        rejected = entry.num_spec_tokens - (len(tokens) - 1)
        if self.async_mode:
            # counted as computed and pending when scheduled, as if all were accepted; a later step of this
            # sequence in flight was placed so too (the runner moved it back by as many)
            seq.num_pending_tokens -= 1 + entry.num_spec_tokens
            if not seq.is_finished and seq.num_computed_tokens:  # 0: preempted to be recomputed
                seq.num_computed_tokens -= rejected
                if seq.status == SequenceStatus.RUNNING:
                    self.block_manager.trim(seq, seq.num_computed_tokens)
                else:  # swapped out with this step in flight: it resumes with blocks for its verified tokens only
                    self.block_manager.trim_swapped(seq, seq.num_computed_tokens)
        elif not seq.is_finished:
            # computed: the last verified token and the accepted proposals; the target's own token is next
            seq.num_computed_tokens += entry.num_new_tokens - rejected
            self.block_manager.trim(seq, seq.num_computed_tokens)
        return seq.num_step_tokens > 0

    def _advance_grammar(self, seq: Sequence, token: int) -> None:
        """Feed the token to the sequence's grammar matcher; a grammar that is complete (it accepted a stop
        token, even under ignore_eos) or that refuses the token ends the sequence. A matcher terminates only by
        accepting a stop token: asked only then (a call per row and step saved at batch 64). While the grammar
        waits for the end of a reasoning span, only that end token counts (the grammar never sees it)."""
        if not self.grammar_accepts:
            return
        if seq.grammar_after_token is not None:  # still reasoning: the grammar starts after its end token
            if token == seq.grammar_after_token:
                seq.grammar_after_token = None
            return
        if not seq.grammar.accept_token(token):
            logger.warning("%s: token %d breaks its grammar; stopping it", seq.seq_id, token)
            self.finish(seq, SequenceStatus.FINISHED_STOPPED)
        elif (token in seq.grammar_stop_ids or not seq.grammar_stop_ids) and seq.grammar.is_terminated():
            self.finish(seq, SequenceStatus.FINISHED_STOPPED)

    def _check_token_stop(self, seq: Sequence, token: int) -> None:
        p, num_output = seq.params, len(seq.output_token_ids)  # (a length, not the properties: every row, every step)
        if num_output >= p.min_tokens and token in p._all_stop_token_ids:
            seq.stop_reason = None if token not in p.stop_token_ids else token
            self.finish(seq, SequenceStatus.FINISHED_STOPPED)
        elif num_output >= seq.max_tokens or len(seq.prompt_token_ids) + num_output >= self.config.max_model_len:
            self.finish(seq, SequenceStatus.FINISHED_LENGTH)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """End a sequence (stop, length or abort) and return its blocks to the pool."""
        if seq.is_finished:
            return
        seq.status = status
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        if self.kv_hold is None or not self.kv_hold(seq, status):
            self.block_manager.free(seq)
        self.seqs.pop(seq.seq_id, None)
        self._sampled_at.pop(seq.seq_id, None)
        self._finished_since_last_step.append(seq.seq_id)
