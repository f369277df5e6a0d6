"""A proposer of controlled acceptance, for measuring the verification mechanism itself (dummy weights make a
real draft's guesses meaningless): it replays the target's own greedy continuation of each prompt, each
proposed token replaced by a wrong one with probability error_rate (deterministic per position)."""

from __future__ import annotations

import random

import numpy as np


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

    def propose_for(self, seq, skip: int = 0) -> list[int]:
        """The speculator's call: propose over the sequence's known tokens."""
        return self.propose(seq.token_array(), skip=skip)

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
