"""Logits and sampling for one step, and the asynchronous trip of the sampled ids to the host."""

from __future__ import annotations

from collections.abc import Callable

import torch

from meshserve.distributed.parallel_state import get_parallel_state
from meshserve.engine.bad_words import banned_by_bad_words
from meshserve.engine.runner_output import ModelRunnerOutput, PendingOutput, to_token_logprobs
from meshserve.engine.scheduler_output import ScheduledSequence, sampling_indices
from meshserve.host_lists import to_device
from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.layers.sampler import Sampler, SamplerOutput, SamplingMetadata, compute_logprobs
from meshserve.spec_decode.rejection_sampler import verify_host_rows, verify_on_device
from meshserve.structured.bitmask import apply_bitmask


def sample_rows(sampler: Sampler, logits: torch.Tensor, rows: list[ScheduledSequence],
                banned: list[list[int]], generator_of: Callable[[ScheduledSequence], torch.Generator | None],
                vocab_size: int, device: torch.device,
                grammar_bitmask: torch.Tensor | None = None) -> tuple[torch.Tensor, SamplerOutput | None]:
    """One token per row from its logits [rows, V]: the grammar masks first (grammar_bitmask: [rows, words],
    one per row, applied to the whole batch in one op), then the plain argmax when no row has settings to
    upload, else the Sampler with the rows' settings (banned: each row's banned ids).
    Returns (token ids, the SamplerOutput or None). StepSampler.sample and the start-up warm-up share it."""
    if grammar_bitmask is not None:  # structured outputs: only the tokens each grammar allows next
        apply_bitmask(logits, grammar_bitmask)
    if plain_greedy(rows, banned):
        return sampler.argmax(logits), None  # plain greedy: no per-row settings to upload
    meta = SamplingMetadata.build(
        [s.params for s in rows],
        [s.prompt_token_ids or [] for s in rows],
        [s.output_token_ids or [] for s in rows],
        [generator_of(s) for s in rows],
        vocab_size,
        device,
        banned_token_ids=banned,
    )
    sampled = sampler(logits, meta)
    return sampled.sampled_token_ids, sampled


def plain_greedy(rows: list[ScheduledSequence], banned: list[list[int]]) -> bool:
    """Every row takes its logits' argmax: greedy, and nothing that reads or changes the logits per row
    (logprobs, penalties, a logit bias, allowed or banned ids)."""
    return all(s.params.greedy and s.params.logprobs is None and not s.params.uses_penalties
               and not s.params.logit_bias and s.params.allowed_token_ids is None for s in rows) and not any(banned)


def _banned(s: ScheduledSequence) -> list[int]:
    """The ids s may not sample this step: its stop ids while min_tokens is not reached, and the last token
    of each bad word whose other tokens end its output (the scheduler sends the output when a word needs it)."""
    p = s.params
    banned = sorted(p._all_stop_token_ids) if s.num_output_tokens < p.min_tokens else []
    if p._bad_words_token_ids:
        banned += banned_by_bad_words(p._bad_words_token_ids, s.output_token_ids)
    return banned


class StepSampler:
    """Turns a step's hidden states into tokens: logits of the sampling rows (and of prompt-logprob rows),
    then a plain argmax for an all-greedy batch beside the full Sampler for everything else.

    Holds what outlives a step: each seeded sequence's generator (until the sequence finishes), pinned
    host buffers for the sampled ids (used in turn by step parity), and the last step's sampled ids on the
    device with their rows by sequence, which the next step's inputs read for tokens still pending when it
    was scheduled. Every TP rank computes logits (the LM head gathers over them); only TP rank 0 samples.
    With share_sampled (TP with async scheduling) rank 0 broadcasts the sampled ids over the TP group on
    the device, so every rank's next step reads its pending tokens without a trip through the host.
    """

    def __init__(self, model: torch.nn.Module, sampler: Sampler, vocab_size: int, device: torch.device,
                 share_sampled: bool = False, num_buffers: int = 2):
        self.model = model
        self.share_sampled = share_sampled
        self.sampler = sampler
        self.vocab_size = vocab_size
        self.device = device
        self.generators: dict[str, torch.Generator] = {}
        self._pinned_ids: list[torch.Tensor | None] = [None] * num_buffers
        # the last step's sampled ids on the device and their rows, by sequence: the next step's input
        # for tokens that were still pending when it was scheduled
        self.last_sampled: torch.Tensor | None = None
        self.last_rows: dict[str, int] = {}
        # speculative decoding: per row of last_sampled, the proposals it rejected (None: no verify rows);
        # the next step's row of that sequence was placed as if all were accepted and moves back by these
        self.last_rejected: torch.Tensor | None = None
        # benchmarks only (`bench spec --replay`): (verify entries, their sequence lengths on the device) ->
        # [B, K + 1] ids the target is taken to pick greedily, replacing the argmax in verification and in
        # plain greedy rows alike (so a run's tokens are the references' whichever steps verified: bf16 rounds
        # a verify step's GEMMs and the KV it writes unlike a decode step's), so the acceptance is the one
        # asked for whatever bf16 near-ties do (spec_decode/replay_proposer.py)
        self.greedy_oracle = None

    def forget(self, seq_ids: list[str]) -> None:
        """Drop the state of finished sequences."""
        for seq_id in seq_ids:
            self.generators.pop(seq_id, None)

    def _generator(self, s: ScheduledSequence) -> torch.Generator | None:
        if s.params.seed is None or s.params.greedy:
            return None
        gen = self.generators.get(s.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(s.params.seed)
            self.generators[s.seq_id] = gen
        return gen

    def sample(self, scheduled: list[ScheduledSequence], hidden: torch.Tensor, meta: AttentionMetadata,
               parity: int, grammar_bitmask: torch.Tensor | None = None) -> PendingOutput:
        """Logits for sampling rows and prompt-logprob rows; sampling on TP rank 0 only (the LM head's
        all-gather needs every TP rank, the sampler does not). Sampled ids come back asynchronously.
        grammar_bitmask: SchedulerOutput.grammar_bitmask (a row per sampling_indices row)."""
        result = ModelRunnerOutput()
        samples = get_parallel_state().tp_rank == 0
        qsl = meta.query_start_loc_cpu

        # prompt logprobs: logits at prompt position j score prompt token j + 1
        for i, s in enumerate(scheduled):
            k = s.params.prompt_logprobs
            if k is None or s.num_computed_tokens >= s.num_prompt_tokens:
                continue
            start = s.num_computed_tokens
            end = min(start + s.num_new_tokens, s.num_prompt_tokens - 1)
            if end <= start:
                continue
            logits = self.model.compute_logits(hidden[qsl[i] : qsl[i] + (end - start)])
            if samples:
                next_ids = torch.tensor(s.prompt_token_ids[start + 1 : end + 1], device=self.device)
                lps = compute_logprobs(logits, next_ids, k)
                result.prompt_logprobs[s.seq_id] = (start, to_token_logprobs(next_ids, *lps))

        spec = None
        if any(s.do_sample and s.num_spec_tokens for s in scheduled):
            spec = self._verify([i for i, s in enumerate(scheduled) if s.do_sample and s.num_spec_tokens],
                                scheduled, hidden, qsl, samples, meta)
        sample_idx = sampling_indices(scheduled)
        if not sample_idx:
            self._remember([], None, spec)
            return self._pending(result, [], None, parity, spec=spec)
        if len(sample_idx) == len(scheduled) and hidden.shape[0] == len(scheduled):
            last_hidden = hidden  # one token a row (decode): every row is its sequence's last, no gather
        elif len(sample_idx) == len(scheduled):  # the usual case: no host-to-device copy needed
            last_hidden = hidden.index_select(0, meta.query_start_loc[1:] - 1)
        else:
            last_rows = torch.tensor([qsl[i + 1] - 1 for i in sample_idx], device=self.device)
            last_hidden = hidden.index_select(0, last_rows)
        logits = self.model.compute_logits(last_hidden)
        rows = [scheduled[i] for i in sample_idx]
        if not samples:
            if self.share_sampled:
                self._remember(rows, self._broadcast(torch.empty(len(rows), dtype=torch.int64,
                                                                 device=self.device)), None)
            return PendingOutput(result)
        banned = [_banned(s) for s in rows]
        token_ids, sampled = sample_rows(self.sampler, logits, rows, banned, self._generator, self.vocab_size,
                                         self.device, grammar_bitmask)
        if self.greedy_oracle is not None and sampled is None:  # all greedy: the oracle picks, as in verify
            seq_lens = (meta.seq_lens[: len(rows)] if len(sample_idx) == len(scheduled)
                        else meta.seq_lens.index_select(0, to_device(sample_idx, self.device)))
            token_ids = self.greedy_oracle(rows, seq_lens)[:, 0]
        return self._pending(result, rows, token_ids, parity, sampled, spec)

    def samples_in_graph(self, scheduled: list[ScheduledSequence]) -> bool:
        """The step's tokens may come from a decode graph's greedy head (DecodeGraphs.run_sampled) instead of
        sample(): one rank samples, every row samples one token as sample_rows' plain argmax, and nothing else
        happens around the sampling (prompt logprobs, verify rows, the benchmarks' greedy oracle)."""
        if get_parallel_state().tp_size > 1 or self.greedy_oracle is not None:
            return False
        if not all(s.do_sample and not s.num_spec_tokens and (s.params.prompt_logprobs is None
                   or s.num_computed_tokens >= s.num_prompt_tokens) for s in scheduled):
            return False
        return plain_greedy(scheduled, [_banned(s) for s in scheduled])

    def sampled_in_graph(self, scheduled: list[ScheduledSequence], token_ids: torch.Tensor,
                         parity: int) -> PendingOutput:
        """The PendingOutput of a step whose greedy ids a graph produced (samples_in_graph said yes): kept as
        the next step's pending inputs and copied to the host as sample() does."""
        return self._pending(ModelRunnerOutput(), scheduled, token_ids, parity)

    def _verify(self, spec_idx: list[int], scheduled: list[ScheduledSequence], hidden: torch.Tensor,
                qsl: list[int], samples: bool, meta: AttentionMetadata):
        """Score every position of the verifying sequences (last verified token and each proposal) and,
        on the sampler rank, verify their proposals (spec_decode/rejection_sampler.py) on the device.
        Returns (entries, [B, 2 + K] rows of accepted count, own token, proposals, each row's proposal count
        on the device), or None elsewhere."""
        entries = [scheduled[i] for i in spec_idx]
        drafts = [s.token_ids[len(s.token_ids) - s.num_spec_tokens:] for s in entries]
        params = [s.params for s in entries]
        # one copy from the host: the verify rows (verify_host_rows), the logits rows, the oracle's step rows
        host_rows = verify_host_rows(drafts, params)
        width = len(host_rows[0])
        logit_rows = [r for i in spec_idx
                      for r in range(qsl[i + 1] - 1 - scheduled[i].num_spec_tokens, qsl[i + 1])]
        flat = [x for row in host_rows for x in row] + logit_rows
        if self.greedy_oracle is not None:
            flat += spec_idx
        flat_d = to_device(flat, self.device)
        n, r = len(entries) * width, len(logit_rows)
        rows_d = flat_d[:n].view(len(entries), width)
        logits = self.model.compute_logits(hidden.index_select(0, flat_d[n : n + r]))
        if not samples:
            return None
        oracle = None
        if self.greedy_oracle is not None:
            oracle = self.greedy_oracle(entries, meta.seq_lens.index_select(0, flat_d[n + r :]))
        packed = verify_on_device(logits, drafts, params, [self._generator(s) for s in entries],
                                  greedy_tokens=oracle, host_rows=rows_d)
        return entries, packed, rows_d[:, 0]

    def _pending(self, result: ModelRunnerOutput, rows: list[ScheduledSequence], token_ids: torch.Tensor | None,
                 parity: int, sampled=None, spec=None) -> PendingOutput:
        """Remember the sampled ids on the device (the next step may need them as inputs) and start their
        copy (and the verify rows', when any) to pinned host memory."""
        if token_ids is not None:
            token_ids = token_ids.long()
            if self.share_sampled:
                self._broadcast(token_ids)
            self._remember(rows, token_ids, spec)
        seq_ids = [s.seq_id for s in rows] if token_ids is not None else None
        ks = [s.params.logprobs for s in rows] if sampled is not None and sampled.logprobs is not None else None
        spec_ids = [e.seq_id for e in spec[0]] if spec is not None else None
        packed = spec[1] if spec is not None else None
        if self.device.type != "cuda":
            return PendingOutput(result, seq_ids, token_ids, None, sampled, ks, spec_ids, packed)
        host = None
        if token_ids is not None:
            i, n = parity, token_ids.shape[0]
            if self._pinned_ids[i] is None or self._pinned_ids[i].shape[0] < n:
                self._pinned_ids[i] = torch.empty(max(n, 256), dtype=torch.int64, pin_memory=True)
            host = self._pinned_ids[i][:n]
            host.copy_(token_ids, non_blocking=True)
        if packed is not None:  # pinned (the caching host allocator's), so the copy does not block
            packed = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True).copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingOutput(result, seq_ids, host, event, sampled, ks, spec_ids, packed)

    def _remember(self, rows: list[ScheduledSequence], token_ids: torch.Tensor | None, spec) -> None:
        """The step's new tokens on the device by sequence: sampled ids, then each verify row's own token
        (the next step's input when it was scheduled before this one was read), and the rejected counts."""
        self.last_rows = {s.seq_id: i for i, s in enumerate(rows)}
        if spec is None:
            self.last_sampled, self.last_rejected = token_ids, None
            return
        entries, packed, num_proposed = spec
        base = len(rows)
        self.last_rows.update((e.seq_id, base + j) for j, e in enumerate(entries))
        rejected = num_proposed - packed[:, 0]
        if token_ids is None:
            self.last_sampled, self.last_rejected = packed[:, 1], rejected
            return
        self.last_sampled = torch.cat([token_ids, packed[:, 1]])
        self.last_rejected = torch.cat([torch.zeros_like(token_ids), rejected])

    @staticmethod
    def _broadcast(token_ids: torch.Tensor) -> torch.Tensor:
        """TP rank 0's sampled ids to every rank of its TP group (in place, on the device)."""
        st = get_parallel_state()
        torch.distributed.broadcast(token_ids, src=st.pp_rank * st.tp_size, group=st.tp_group)
        return token_ids
