"""Prompt lookup: the longest suffix n-gram within [min, max], latest match, continuation capped at k."""

from __future__ import annotations

import numpy as np
import pytest

from meshserve import SamplingParams
from meshserve.engine.sequence import Sequence, SequenceStatus
from meshserve.spec_decode import ngram_proposer
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


def _seq(prompt: list[int], seq_id: str = "s") -> Sequence:
    return Sequence(seq_id=seq_id, request_id=seq_id, index=0, prompt_token_ids=prompt, params=SamplingParams(),
                    max_tokens=1000)


@pytest.mark.parametrize("max_walk", [ngram_proposer.MAX_WALK, 2])  # 2: the vectorised fallback runs often
def test_incremental_index_matches_the_plain_rule_as_tokens_arrive(monkeypatch, max_walk):
    """propose_for (the per-sequence index) against the plain rule, step by step: tokens appended several at a
    time (accepted proposals), skips (a step in flight), preemptions (recompute: the same tokens), sequences
    sharing one prompt list (n > 1), and a sequence checked again after steps without a lookup (gate off)."""
    monkeypatch.setattr(ngram_proposer, "MAX_WALK", max_walk)
    rng = np.random.default_rng(1)
    walked_past = 0
    for _ in range(300):
        n_min = int(rng.integers(1, 4))
        n_max = int(rng.integers(n_min, 7))
        k = int(rng.integers(1, 5))
        alphabet = int(rng.choice([2, 3, 6, 50]))
        proposer, plain = NgramProposer(k, n_min, n_max), NgramProposer(k, n_min, n_max, use_index=False)
        prompt = rng.integers(0, alphabet, size=int(rng.integers(1, 40))).tolist()
        seqs = [_seq(prompt, "a"), _seq(prompt, "b")]
        for _step in range(25):
            for seq in seqs:
                seq.output_token_ids.extend(rng.integers(0, alphabet, size=int(rng.integers(1, 5))).tolist())
                if rng.random() < 0.1:  # preempted and recomputed: its tokens stay
                    seq.status, seq.num_computed_tokens = SequenceStatus.PREEMPTED, 0
                if rng.random() < 0.2:  # no proposal this step (gate off, paused): the index catches up later
                    continue
                skip = int(rng.choice([0, 0, 1, 2, 4]))
                tokens = seq.prompt_token_ids + seq.output_token_ids
                expected = _reference(tokens, k, n_min, n_max, skip)
                assert proposer.propose_for(seq, skip) == expected, (tokens, k, n_min, n_max, skip)
                assert plain.propose_for(seq, skip) == expected
                assert seq.ngram_index.tokens == tokens
                walked_past += seq.ngram_index.lookup(k, n_max, skip) is None
    if max_walk == 2:
        assert walked_past > 0  # the fallback was exercised, not only the walk


def test_index_starts_over_when_the_tokens_are_replaced():
    proposer = NgramProposer(2, 1, 3)
    seq = _seq([5, 6, 1, 2, 5, 6])
    assert proposer.propose_for(seq) == [1, 2]
    index = seq.ngram_index
    seq.output_token_ids = [9, 5, 9]  # a new list (not an append): indexed again, not extended
    assert proposer.propose_for(seq) == [5, 9]
    assert seq.ngram_index is index and index.tokens == [5, 6, 1, 2, 5, 6, 9, 5, 9]
    seq.output_token_ids.append(5)
    assert proposer.propose_for(seq) == [9, 5]  # latest "5"


def test_a_long_repeated_run_needs_no_fallback():
    """A sequence repeating one token (a model stuck, or the host bench's fake): the latest candidate already
    matches n_max tokens, so the lookup checks one candidate, not every occurrence."""
    seq = _seq(list(range(100)) + [7] * 500)
    proposer = NgramProposer(3, 2, 5)
    assert proposer.propose_for(seq) == [7]
    assert seq.ngram_index.lookup(3, 5, skip=0) == [7]
    assert seq.ngram_index.lookup(3, 5, skip=1) == [7]  # the second latest reaches past one skipped


@pytest.mark.parametrize("max_walk", [ngram_proposer.MAX_WALK, 2])
def test_windowed_index_keeps_the_plain_rule_past_the_window(monkeypatch, max_walk):
    """A window of 12 tokens (dropped 4 at a time) on sequences of up to ~200: every proposal is still the
    plain rule's over the whole sequence (the index answers when its window decides, the search otherwise),
    and the index never holds more than window + step tokens."""
    monkeypatch.setattr(ngram_proposer, "MAX_WALK", max_walk)
    monkeypatch.setattr(ngram_proposer, "INDEX_WINDOW", 12)
    monkeypatch.setattr(ngram_proposer, "INDEX_EVICT_STEP", 4)
    rng = np.random.default_rng(2)
    answered = dropped = 0
    for _ in range(60):
        n_min = int(rng.integers(1, 4))
        n_max = int(rng.integers(n_min, 7))
        k = int(rng.integers(1, 5))
        alphabet = int(rng.choice([2, 3, 6, 50]))
        proposer = NgramProposer(k, n_min, n_max)
        seq = _seq(rng.integers(0, alphabet, size=int(rng.integers(1, 40))).tolist())
        for _step in range(40):
            seq.output_token_ids.extend(rng.integers(0, alphabet, size=int(rng.integers(1, 5))).tolist())
            skip = int(rng.choice([0, 0, 1, 2]))
            tokens = seq.prompt_token_ids + seq.output_token_ids
            assert proposer.propose_for(seq, skip) == _reference(tokens, k, n_min, n_max, skip)
            index = seq.ngram_index
            assert index.tokens == tokens[index.base :] and len(index.prev) == len(index.tokens) - 1
            assert len(index.tokens) <= 16 and len(index.heads) <= 16
            assert all(index.base <= e for e in index.heads.values())
            if index.base > 0:
                dropped += 1
                answered += index.lookup(k, n_max, skip) is not None
    assert dropped > 0 and answered > 0  # the window dropped tokens and still decided some lookups itself


def test_index_memory_is_bounded_by_the_window():
    """A 30k-token sequence (a long prompt, then decode steps) keeps the index at the last INDEX_WINDOW to
    INDEX_WINDOW + INDEX_EVICT_STEP tokens, and a repetitive one is still answered from the window."""
    window, step = ngram_proposer.INDEX_WINDOW, ngram_proposer.INDEX_EVICT_STEP
    proposer = NgramProposer(4, 2, 5)
    seq = _seq(np.random.default_rng(0).integers(0, 1000, size=3 * window).tolist())
    proposer.propose_for(seq)
    index = seq.ngram_index
    assert index.base == 2 * window and len(index.tokens) == window  # the long prompt: only its window
    for t in range(2 * step):
        seq.output_token_ids.append(t % 7)
        proposer.propose_for(seq)
        assert window <= len(index.tokens) <= window + step
        assert len(index.prev) == len(index.tokens) - 1 and len(index.heads) <= len(index.tokens)
    assert index.base > 2 * window  # dropped on the way
    assert proposer.propose_for(seq) == [4, 5, 6, 0]  # the cycle 0..6: matched within the window
    assert index.lookup(4, 5) == [4, 5, 6, 0]
