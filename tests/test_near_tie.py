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


def test_a_three_way_near_tie_needs_enough_logprobs():
    """Three tokens within a hair (flat random-weight logits): plain picks 7 over 8, the other run 8 over 4 with 7
    third. Top 2 cannot show that 7 is still close in the other run (the GPU test's step 29 of Llama-3.1-8B,
    bf16); top 3 can, and the gap bounds still reject the same flip where the third token is far behind."""
    plain_top = {7: -1.090, 8: -1.095, 4: -1.100}
    other_top = {8: -1.088, 4: -1.092, 7: -1.096}
    plain = _run([7], [plain_top])
    top2 = _run([8], [{t: other_top[t] for t in (8, 4)}])
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_agree_until_near_tie(_run([7], [{t: plain_top[t] for t in (7, 8)}]), top2)
    assert assert_agree_until_near_tie(plain, _run([8], [other_top])) == 0
    far = _run([8], [{8: -0.5, 4: -1.0, 7: -1.8}])  # 7 fell by 0.7: the distribution moved, not a flip
    with pytest.raises(AssertionError, match="logprob"):
        assert_agree_until_near_tie(plain, far)
