"""Prompt-lookup (n-gram) proposals: find the sequence's last n tokens earlier in its own tokens and propose
what followed them there. Free to compute, and right whenever the output copies its input (code edits,
summaries quoting the passage, extraction)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from meshserve.engine.sequence import Sequence

# candidates the incremental lookup checks one by one before it hands the step to the vectorised search: the
# latest candidate usually matches n_max tokens and ends the walk; a long walk means the last n_min tokens are
# common but rarely extend that far, where numpy over the whole array beats Python per candidate
MAX_WALK = 48
# tokens an NgramIndex holds at the most (~136 bytes of host memory each, over its lists and dict): it keeps the
# last INDEX_WINDOW of a longer sequence, dropping the oldest INDEX_EVICT_STEP at a time (not one per step, which
# would move the whole list every step), so it holds between INDEX_WINDOW and INDEX_WINDOW + INDEX_EVICT_STEP
INDEX_WINDOW = 8192
INDEX_EVICT_STEP = 1024


class NgramProposer:
    """Proposes up to k tokens from the longest suffix n-gram (prompt_lookup_min <= n <= prompt_lookup_max)
    that occurs earlier in the sequence; among matches of that length the latest wins (the nearest context).

    Two paths with the same proposals. propose_for(seq), the engine's: each sequence keeps an NgramIndex
    extended by its new tokens, so a step costs O(new tokens + candidates checked) instead of O(history); past
    INDEX_WINDOW tokens the index holds only the latest ones, and a step it cannot decide from them (see
    NgramIndex) costs the vectorised search over the whole history, as before the index existed.
    propose(token_ids), the plain one (use_index=False, and the index's fallback after MAX_WALK candidates):
    vectorised with numpy, the candidates are the earlier occurrences of the last token, all extended
    backwards up to n_max in one [candidates, n_max - 1] comparison.
    """

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int,
                 use_index: bool = True):
        self.k = num_speculative_tokens
        self.n_min = prompt_lookup_min
        self.n_max = prompt_lookup_max
        self.use_index = use_index
        self._offsets_by_n: dict[int, np.ndarray] = {}

    def propose_for(self, seq: Sequence, skip: int = 0) -> list[int]:
        """propose(seq's known tokens, skip=skip), from the sequence's NgramIndex (made on first use)."""
        if not self.use_index:
            return self.propose(seq.token_array(), skip=skip)
        index = seq.ngram_index
        if index is None or index.n_min != self.n_min:
            index = seq.ngram_index = NgramIndex(self.n_min)
        index.extend(seq.prompt_token_ids, seq.output_token_ids)
        proposal = index.lookup(self.k, self.n_max, skip)
        return self.propose(seq.token_array(), skip=skip) if proposal is None else proposal

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


class NgramIndex:
    """One sequence's latest tokens (a list: tokens[i] is the sequence's token base + i) and, per end e of an
    n_min-gram among them, where that n_min-gram ended before (prev[e - base]; heads holds each n_min-gram's
    latest end; positions are the sequence's): a chain per n_min-gram, newest first. Extended by the tokens
    appended since the last lookup; a lookup walks the chain of the last n_min tokens, so only positions that
    can match at least n_min tokens are ever compared.

    Bounded memory: past INDEX_WINDOW + INDEX_EVICT_STEP tokens the oldest are dropped (base moves on) with
    their chain entries, so the index holds at most that many tokens. Its proposals stay those of the plain
    rule over the whole sequence: with tokens dropped, a lookup returns a match only when it is the latest one
    of n_max tokens (nothing older can beat it), and None otherwise (the caller searches the whole history),
    as it does when a candidate's match would reach back past base.

    Tokens are only ever appended to a sequence (preemption recomputes the same ones); a sequence whose prompt
    or output list was replaced, or that has fewer tokens than indexed, is indexed again (its last window)."""

    __slots__ = ("_output", "_prompt", "base", "heads", "n_min", "prev", "tokens")

    def __init__(self, n_min: int):
        self.n_min = n_min
        self.base = 0  # the sequence's position of tokens[0]: those before it were dropped
        self.tokens: list[int] = []
        self.heads: dict[tuple[int, ...], int] = {}
        # -1: no earlier end known (and for ends whose n_min-gram starts before base)
        self.prev: list[int] = []
        self._prompt: list[int] | None = None
        self._output: list[int] | None = None

    def extend(self, prompt: list[int], output: list[int]) -> None:
        """Take prompt + output's tokens not seen yet and index every end but the last position (a match
        ends before the last token, whose continuation is what is proposed)."""
        total, p = len(prompt) + len(output), len(prompt)
        have = self.base + len(self.tokens)
        if prompt is not self._prompt or output is not self._output or have > total:
            self._prompt, self._output, have = prompt, output, -1
        if have < total - INDEX_WINDOW:  # new, or more new tokens than the window: start at the window
            have = max(0, total - INDEX_WINDOW)
            self.base, self.tokens, self.heads, self.prev = have, [], {}, []
        elif have < 0:
            self.base, self.tokens, self.heads, self.prev, have = 0, [], {}, [], 0
        tokens, base = self.tokens, self.base
        if have < p:
            tokens += prompt[have:]
            have = p
        if have < total:
            tokens += output[have - p :]
        heads, prev, n = self.heads, self.prev, self.n_min
        for e in range(base + len(prev), base + len(tokens) - 1):
            if e - n + 1 < base:
                prev.append(-1)
                continue
            key = tuple(tokens[e - n + 1 - base : e + 1 - base])
            prev.append(heads.get(key, -1))
            heads[key] = e
        if len(tokens) > INDEX_WINDOW + INDEX_EVICT_STEP:
            self._drop(len(tokens) - INDEX_WINDOW)

    def _drop(self, count: int) -> None:
        """Drop the oldest count tokens and the chain heads of the ends whose n_min-gram starts among them
        (later ends on those chains stop at them: see lookup)."""
        tokens, base, n = self.tokens, self.base, self.n_min
        for e in range(base + n - 1, min(base + count + n - 1, base + len(self.prev))):
            key = tuple(tokens[e - n + 1 - base : e + 1 - base])
            if self.heads.get(key) == e:
                del self.heads[key]
        del tokens[:count]
        del self.prev[:count]
        self.base = base + count

    def lookup(self, k: int, n_max: int, skip: int = 0) -> list[int] | None:
        """NgramProposer.propose's rule over the sequence (call extend first); None when more than MAX_WALK
        candidates would need checking, or when the dropped tokens could hold the answer (the caller searches
        vectorised instead)."""
        tokens, n_min, base = self.tokens, self.n_min, self.base
        length = base + len(tokens)
        if k <= 0 or length <= n_min:
            return []
        cap = min(n_max, length - 1)  # >= n_min here
        limit = length - 2 - skip  # a match's continuation must reach past the skipped tokens
        prev, e = self.prev, self.heads.get(tuple(tokens[length - n_min - base :]), -1)
        best, best_end, walked = 0, -1, 0
        while e >= base:  # newest first: only a longer match replaces the best (the latest wins among equals)
            if e <= limit:
                walked += 1
                if walked > MAX_WALK:
                    return None
                m = n_min  # every end on the chain matches the last n_min tokens
                while m < cap and e - m >= base and tokens[e - m - base] == tokens[length - 1 - m - base]:
                    m += 1
                if m < cap and 0 <= e - m < base:  # the next token to compare was dropped
                    return None
                if m > best:
                    best, best_end = m, e
                    if m == cap:
                        break
            e = prev[e - base]
        if best < cap and base > 0:  # a dropped end may match longer, or be the only match
            return None
        if best == 0:
            return []
        return tokens[best_end + 1 + skip - base : best_end + 1 + skip + k - base]
