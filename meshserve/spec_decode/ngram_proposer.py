"""Prompt-lookup (n-gram) proposals: find the sequence's last n tokens earlier in its own tokens and propose
what followed them there. Free to compute, and right whenever the output copies its input (code edits,
summaries quoting the passage, extraction)."""

from __future__ import annotations

import numpy as np


class NgramProposer:
    """Proposes up to k tokens from the longest suffix n-gram (prompt_lookup_min <= n <= prompt_lookup_max)
    that occurs earlier in the sequence; among matches of that length the latest wins (the nearest context).

    Vectorised over the candidate positions with numpy: the candidates are the earlier occurrences of the
    last token, all extended backwards up to n_max in one [candidates, n_max - 1] comparison.
    """

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int):
        self.k = num_speculative_tokens
        self.n_min = prompt_lookup_min
        self.n_max = prompt_lookup_max
        self._offsets_by_n: dict[int, np.ndarray] = {}

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
        # every candidate extended backwards at once: column j - 1 compares the token j before its end with
        # the token j before the last one (a position before the start never matches); a candidate's match
        # is 1 plus its run of leading equal columns. One array op per step, not per column: this runs for
        # every sequence in every step
        n = min(self.n_max, length - 1)
        if n > 1:
            back = ends[:, None] - self._offsets(n)
            equal = token_ids[back] == token_ids[length - 2 : length - 1 - n : -1]  # n <= length - 1
            equal &= back >= 0
            matched = 1 + np.where(equal.all(axis=1), n - 1, equal.argmin(axis=1))
        else:
            matched = np.ones(ends.shape[0], dtype=np.int64)
        best = int(matched.max())
        if best < self.n_min:
            return []
        end = int(ends[np.flatnonzero(matched == best)[-1]])
        return token_ids[end + 1 + skip : end + 1 + skip + k].tolist()

    def _offsets(self, n: int) -> np.ndarray:
        """[[1, 2, ..., n - 1]]: how far back each compared column is (cached per n)."""
        offsets = self._offsets_by_n.get(n)
        if offsets is None:
            offsets = self._offsets_by_n[n] = np.arange(1, n, dtype=np.int64)[None, :]
        return offsets
