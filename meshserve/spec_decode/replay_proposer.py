"""A proposer of controlled acceptance, for measuring the verification mechanism itself (dummy weights make a
real draft's guesses meaningless): it replays the target's own greedy continuation of each prompt, each
proposed token replaced by a wrong one with probability error_rate (deterministic per position).

In bf16 the target's own greedy tokens depend on the step's shape (a verify step's GEMMs round differently
from a decode step's GEMV), and dummy weights' logits are full of near-ties: the replayed continuation stops
matching after a few tokens and the acceptance asked for is not the one measured. ReplayOracle then stands in
for the target's argmax (after it is computed: the step's work is unchanged), in verification and in plain
greedy rows alike, so a proposal is accepted exactly when it is the reference token at its position and the
output is the references whichever steps verified (a plain step's own argmax would read KV that verify steps
wrote with other roundings, and drift from the reference where the run without speculation did not: issue 22,
batch 64 'identical False'). Forced identity checks the bookkeeping (accepted counts, positions, rows moved
back), not the numerics: the CPU fp32 tests compare real argmaxes."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch

from meshserve.host_lists import to_device


class ReplayProposer:
    """Install with `llm.engine.core.speculator.proposer = ReplayProposer(...)` on an engine started with
    an n-gram speculative_config (which sets k and the scheduling); references map each prompt (token ids)
    to its greedy output without speculation."""

    def __init__(
        self,
        references: dict[tuple[int, ...], list[int]],
        k: int,
        error_rate: float,
        vocab_size: int,
        seed: int = 0,
    ):
        self.references = references
        self.k = k
        self.vocab_size = vocab_size
        # the error pattern of every output position, fixed up front (so runs are repeatable)
        rng = random.Random(seed)
        longest = max((len(o) for o in references.values()), default=0)
        self.wrong = [rng.random() < error_rate for _ in range(longest + k)]
        self._by_len: dict[int, list[tuple[tuple[int, ...], list[int]]]] = {}
        for prompt, out in references.items():
            self._by_len.setdefault(len(prompt), []).append((prompt, out))
        self.reference_of: dict[str, tuple[int, ...]] = {}  # seq_id -> its prompt (the references' key)

    def propose_for(self, seq, skip: int = 0) -> list[int]:
        """The speculator's call: propose over the sequence's known tokens."""
        ids = seq.token_array()
        if seq.seq_id not in self.reference_of:
            self.reference_of[seq.seq_id] = tuple(seq.prompt_token_ids)
        return self.propose(ids, skip=skip)

    def propose(self, token_ids: np.ndarray, max_tokens: int | None = None, skip: int = 0) -> list[int]:
        ids = token_ids.tolist()
        for n, entries in self._by_len.items():
            head = tuple(ids[:n])
            for prompt, out in entries:
                if head == prompt:
                    done = len(ids) - n + skip
                    guess = out[done : done + self.k]
                    return [
                        (t + 1) % self.vocab_size if self.wrong[done + j] else t for j, t in enumerate(guess)
                    ]
        return []


class ReplayOracle:
    """The target's greedy pick at every verify position, from the references (StepSampler.greedy_oracle):
    row b's logits at position p choose token p + 1 of prompt + reference output."""

    def __init__(self, proposer: ReplayProposer, device: torch.device,
                 prompt_of: Callable[[str], Sequence[int]] | None = None):
        self.proposer = proposer
        # seq_id -> its prompt ids (the engine's requests): the rows the proposer has not met
        self.prompt_of = prompt_of or (lambda seq_id: self.proposer.reference_of[seq_id])
        keys = list(proposer.references)
        width = max(len(k) + len(proposer.references[k]) for k in keys) + proposer.k + 1
        table = torch.zeros(len(keys), width, dtype=torch.int64)
        for r, key in enumerate(keys):
            full = list(key) + proposer.references[key]
            table[r, : len(full)] = torch.tensor(full)
        self.table = table.to(device)
        self.row_of = {key: r for r, key in enumerate(keys)}
        self._row_of_seq: dict[str, int] = {}
        self.device = device

    def _row(self, entry) -> int:
        """The table row of a scheduled sequence (by its prompt, the references' key; cached per sequence)."""
        row = self._row_of_seq.get(entry.seq_id)
        if row is None:
            prompt = self.proposer.reference_of.get(entry.seq_id)
            if prompt is None:  # a row no proposal was made for yet (its prefill's, or a plain step's)
                prompt = tuple(self.prompt_of(entry.seq_id))
            row = self._row_of_seq[entry.seq_id] = self.row_of[prompt]
        return row

    def __call__(self, entries, seq_lens: torch.Tensor) -> torch.Tensor:
        """entries: the verifying ScheduledSequences (or plain greedy rows: no proposals, one column);
        seq_lens: their lengths on the device (after any move back for proposals a step still in flight
        rejected). Returns [B, K + 1]."""
        ks = [e.num_spec_tokens for e in entries]
        kmax = max(ks)
        # one copy without a stream sync (torch.tensor(..., device=cuda) would wait for the forward)
        packed = to_device([[self._row(e), k] for e, k in zip(entries, ks)], self.device)
        rows, k_t = packed[:, 0], packed[:, 1]
        cols = torch.minimum(torch.arange(kmax + 1, device=self.device).unsqueeze(0), k_t.unsqueeze(1))
        pos = (seq_lens.long() - k_t).unsqueeze(1) + cols  # the token each verify row's logits choose
        pos = pos.clamp(max=self.table.shape[1] - 1)
        return self.table[rows.unsqueeze(1), pos]
