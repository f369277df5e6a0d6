"""Prompt-lookup (n-gram) proposals: find the sequence's last n tokens earlier in its own tokens and propose
what followed them there. Free to compute, and right whenever the output copies its input (code edits,
summaries quoting the passage, extraction)."""

from __future__ import annotations

import numpy as np


class NgramProposer:
    """Proposes up to k tokens from the longest suffix n-gram (prompt_lookup_min <= n <= prompt_lookup_max)
    that occurs earlier in the sequence; among matches of that length the latest wins (the nearest context).

    Vectorised over the candidate positions with numpy: the candidates are the earlier occurrences of the
    last token, and each is extended backwards one column at a time up to n_max.
    """

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int):
        self.k = num_speculative_tokens
        self.n_min = prompt_lookup_min
        self.n_max = prompt_lookup_max

    def propose(self, token_ids: np.ndarray, max_tokens: int | None = None, skip: int = 0) -> list[int]:
        """Proposed continuation of token_ids (prompt + output so far), at most min(k, max_tokens) long.
        skip > 0 proposes for the positions after the next `skip` (async scheduling: tokens of a step in
        flight), from the same match: its continuation past them."""
        k = self.k if max_tokens is None else min(self.k, max_tokens)
        length = token_ids.shape[0]
        if k <= 0 or length <= self.n_min:
            return []
        # ends of candidate matches: earlier positions holding the last token (the continuation starts at +1)
        ends = np.flatnonzero(token_ids[: length - 1] == token_ids[length - 1])
        if skip:  # only matches whose continuation reaches past the skipped tokens
            ends = ends[ends + 1 + skip < length]
        if ends.shape[0] == 0:
            return []
        matched = np.ones(ends.shape[0], dtype=np.int64)  # length of each candidate's match so far
        alive = np.ones(ends.shape[0], dtype=bool)
        for j in range(1, min(self.n_max, length - 1)):
            idx = ends - j
            ok = alive & (idx >= 0)
            ok[ok] = token_ids[idx[ok]] == token_ids[length - 1 - j]
            if not ok.any():
                break
            matched += ok
            alive = ok
        best = int(matched.max())
        if best < self.n_min:
            return []
        end = int(ends[np.flatnonzero(matched == best)[-1]])
        return token_ids[end + 1 + skip : end + 1 + skip + k].tolist()
