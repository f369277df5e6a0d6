"""Greedy decodes that may differ only by fp32 summation order: the same tokens up to a first divergence, which
must be a near-tie, and the same logprobs before it (tests/gpu/test_pdl_decode.py; checked on CPU in
tests/test_near_tie.py)."""

from __future__ import annotations


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists differ (or one ends), None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def assert_agree_until_near_tie(plain, other, tie: float = 0.2, close: float = 0.15) -> int | None:
    """plain / other: CompletionOutputs of the same greedy request with logprobs >= 2. Before the first divergence
    d, each chosen token's logprob in `other` is within `close` of plain's. At d (if any) the two chosen tokens
    are a near-tie: both appear in both runs' top logprobs, within `tie` of each other in the plain run, and
    each within `close` of its plain logprob in the other run (the same distribution, a flipped argmax), so
    wrong values fail here as surely as on the prefix. Returns d."""
    d = first_divergence(plain.token_ids, other.token_ids)
    for step in range(len(plain.token_ids) if d is None else d):
        tok = plain.token_ids[step]
        got, want = other.logprobs[step][tok].logprob, plain.logprobs[step][tok].logprob
        assert abs(got - want) <= close, f"step {step}: token {tok} logprob {got:.4f} vs plain {want:.4f}"
    if d is None:
        return None
    assert d < min(len(plain.token_ids), len(other.token_ids)), f"lengths differ: {d}"
    a, b = plain.token_ids[d], other.token_ids[d]
    p, o = plain.logprobs[d], other.logprobs[d]
    tops = lambda lp: {t: round(v.logprob, 3) for t, v in lp.items()}  # noqa: E731
    assert b in p and a in o, (f"step {d}: {b} (other's) not in plain's top {tops(p)} or {a} (plain's) not in "
                               f"the other's top {tops(o)}: not a near-tie")
    gap = p[a].logprob - p[b].logprob
    assert 0 <= gap <= tie, f"step {d}: plain prefers {a} over {b} by {gap:.4f} > {tie}: not a near-tie"
    for tok in (a, b):
        assert abs(o[tok].logprob - p[tok].logprob) <= close, \
            f"step {d}: token {tok} logprob {o[tok].logprob:.4f} vs plain {p[tok].logprob:.4f}"
    return d
