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
