"""The near-tie agreement check (tests/near_tie.py) accepts a flipped argmax at a tie and nothing else."""

from __future__ import annotations

import pytest

from meshserve.outputs import CompletionOutput, Logprob
from tests.near_tie import assert_agree_until_near_tie, first_divergence


def _run(tokens, tops):
    """A greedy CompletionOutput: tops[i] = {token: logprob} at step i (the chosen token is the argmax)."""
    logprobs = [{t: Logprob(lp) for t, lp in top.items()} for top in tops]
    assert all(max(top, key=top.get) == t for t, top in zip(tokens, tops))
    return CompletionOutput(0, "", list(tokens), logprobs=logprobs)


PLAIN = _run([5, 7, 9], [{5: -0.1, 6: -3.0}, {7: -0.60, 8: -0.70}, {9: -0.2, 1: -2.0}])


def test_equal_runs_and_a_flip_at_a_near_tie_pass():
    same = _run([5, 7, 9], [{5: -0.12, 6: -3.0}, {7: -0.62, 8: -0.69}, {9: -0.21, 1: -2.0}])
    assert assert_agree_until_near_tie(PLAIN, same) is None
    flipped = _run([5, 8, 2], [{5: -0.1, 6: -3.0}, {8: -0.62, 7: -0.66}, {2: -0.1, 3: -4.0}])
    assert assert_agree_until_near_tie(PLAIN, flipped) == 1


@pytest.mark.parametrize("other,match", [
    # a flip where plain's margin is wide: not a near-tie
    (_run([6, 7, 9], [{6: -0.1, 5: -0.2}, {7: -0.6}, {9: -0.2}]), "not a near-tie"),
    # the flipped-to token is not among plain's top logprobs at all (a wrong-values kernel's typical flip)
    (_run([5, 4, 9], [{5: -0.1, 6: -3.0}, {4: -0.5, 7: -0.9}, {9: -0.2}]), "not a near-tie"),
    # the same tokens, but drifting logprobs on the common prefix
    (_run([5, 7, 9], [{5: -0.1, 6: -3.0}, {7: -0.95, 8: -1.0}, {9: -0.2}]), "logprob"),
    # a flip at a plain-run tie whose probabilities the other run does not reproduce
    (_run([5, 8, 9], [{5: -0.1, 6: -3.0}, {8: -0.05, 7: -3.0}, {9: -0.2}]), "logprob"),
])
def test_wrong_values_fail(other, match):
    with pytest.raises(AssertionError, match=match):
        assert_agree_until_near_tie(PLAIN, other)


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 4, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
