"""Prompt lookup: the longest suffix n-gram within [min, max], latest match, continuation capped at k."""

from __future__ import annotations

import numpy as np

from meshserve.spec_decode.ngram_proposer import NgramProposer


def _p(ids, k=3, lo=1, hi=3, max_tokens=None):
    return NgramProposer(k, lo, hi).propose(np.asarray(ids, dtype=np.int64), max_tokens)


def test_longest_match_wins_over_a_later_shorter_one():
    #        [1 2 3] 4 5 6 ... [9 3] 7 7 ... then suffix "1 2 3"
    ids = [1, 2, 3, 4, 5, 6, 9, 3, 7, 7, 1, 2, 3]
    assert _p(ids) == [4, 5, 6]  # the 3-gram match, not the later 1-gram "3 -> 7"
    assert _p(ids, hi=1) == [7, 7, 1]  # n = 1 only: the latest "3" is followed by 7 7 1


def test_latest_match_among_equal_lengths_and_caps():
    ids = [5, 6, 1, 5, 6, 2, 5, 6]
    assert _p(ids, k=2) == [2, 5]
    assert _p(ids, k=5) == [2, 5, 6]  # the continuation stops at the sequence's end
    assert _p(ids, k=5, max_tokens=1) == [2]


def test_no_proposal_below_min_or_without_a_match():
    assert _p([1, 2, 3, 4]) == []
    assert _p([1, 2, 9, 2], lo=2) == []  # only the 1-gram "2" matches
    assert _p([7]) == []
    assert _p([3, 3], k=2) == [3]


def test_skip_proposes_past_the_tokens_of_a_step_in_flight():
    ids = np.asarray([5, 6, 1, 2, 3, 4, 5, 6], dtype=np.int64)
    proposer = NgramProposer(2, 1, 3)
    assert proposer.propose(ids) == [1, 2]
    assert proposer.propose(ids, skip=1) == [2, 3]  # the same match, past the pending token
    assert proposer.propose(ids, skip=3) == [4, 5]
    assert proposer.propose(ids, skip=6) == []  # no match reaches that far
    # a later match whose continuation ends too soon gives way to an earlier one that reaches
    ids = np.asarray([7, 1, 2, 3, 4, 9, 7, 1, 9, 7], dtype=np.int64)
    assert proposer.propose(ids) == [1, 9]
    assert proposer.propose(ids, skip=2) == [7]  # the latest match still reaches one token past
    assert proposer.propose(ids, skip=3) == [4, 9]  # it does not reach: the earlier match does


def _reference(tokens, k, n_min, n_max, skip=0, max_tokens=None):
    """The rule in plain Python, one candidate at a time: the longest suffix match (capped at n_max) ending
    before the last token whose continuation reaches past `skip` tokens, the latest among equal lengths."""
    k = k if max_tokens is None else min(k, max_tokens)
    length = len(tokens)
    if k <= 0 or length <= n_min:
        return []
    best, best_end = 0, None
    for end in range(length - 1):
        if end + 1 + skip >= length:
            continue
        m = 0
        while m < min(n_max, length - 1) and end - m >= 0 and tokens[end - m] == tokens[length - 1 - m]:
            m += 1
        if m and m >= best:
            best, best_end = m, end
    if best < n_min:
        return []
    return tokens[best_end + 1 + skip : best_end + 1 + skip + k]


def test_matches_the_plain_rule_on_random_sequences():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        n_min = int(rng.integers(1, 4))
        n_max = int(rng.integers(n_min, 7))
        k, skip = int(rng.integers(1, 5)), int(rng.choice([0, 0, 1, 2]))
        max_tokens = [None, 1, 2][int(rng.integers(0, 3))]
        tokens = rng.integers(0, int(rng.choice([2, 3, 6])), size=int(rng.integers(1, 30))).tolist()
        got = NgramProposer(k, n_min, n_max).propose(np.asarray(tokens, dtype=np.int64), max_tokens, skip)
        assert got == _reference(tokens, k, n_min, n_max, skip, max_tokens), (tokens, k, n_min, n_max, skip)
