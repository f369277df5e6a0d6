"""Verification: greedy keeps the argmax prefix; rejection sampling reproduces the target's distribution."""

from __future__ import annotations

import pytest
import torch

from meshserve.sampling import SamplingParams
from meshserve.spec_decode.rejection_sampler import target_probs, verify

V = 6


def test_greedy_accepts_longest_matching_prefix_then_the_targets_token():
    torch.manual_seed(0)
    logits = torch.randn(4 + 3, V)  # seq 0: 3 proposals (4 rows), seq 1: 2 proposals (3 rows)
    am = logits.argmax(-1).tolist()
    drafts = [[am[0], am[1], (am[2] + 1) % V], [(am[4] + 1) % V, am[5]]]
    res = verify(logits, drafts, [SamplingParams(temperature=0)] * 2, [None, None])
    assert res.num_accepted == [2, 0]
    assert res.token_ids == [[am[0], am[1], am[2]], [am[4]]]
    # all accepted: the bonus token is the argmax after the last proposal
    res = verify(logits[:4], [am[:3]], [SamplingParams(temperature=0)], [None])
    assert res.token_ids == [am[:4]] and res.num_accepted == [3]


def _chi2_p(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=V).double()
    expected = probs.double() * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token the target gives probability 0"
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(
        torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2)
    )  # chi2 p-value


@pytest.mark.parametrize("draft_kind", ["one_hot", "distribution"])
def test_rejection_sampling_preserves_the_target_distribution(draft_kind):
    """Drafts drawn from q (or a fixed token for one-hot q): the first output token is distributed as p_0
    and, given that the first proposal was accepted, the second as p_1; checked by chi-square on 40k draws."""
    g = torch.Generator().manual_seed(1)
    k, n = 2, 40_000
    target_logits = torch.randn(k + 1, V, generator=g) * 1.5
    params = SamplingParams(temperature=0.8, top_k=5)
    p = target_probs(target_logits, [params] * (k + 1))
    if draft_kind == "distribution":
        q = torch.softmax(torch.randn(k, V, generator=g), -1)
        drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(k)], 1)
        draft_probs = q.repeat(n, 1)
    else:
        drafts = p[:k].argmax(-1).unsqueeze(0).repeat(n, 1)  # a likely token, so position 1 gets samples
        draft_probs = None
    torch.manual_seed(2)
    res = verify(target_logits.repeat(n, 1), drafts.tolist(), [params] * n, [None] * n, draft_probs)
    first = torch.tensor([t[0] for t in res.token_ids])
    assert _chi2_p(first, p[0]) > 1e-3
    accepted = [t for t, a in zip(res.token_ids, res.num_accepted) if a >= 1]
    second = torch.tensor([t[1] for t in accepted])
    assert len(second) > 2000
    assert _chi2_p(second, p[1]) > 1e-3
    # acceptance of the first proposal: sum_x min(p(x), q(x)) (one-hot q: p(d))
    q0 = draft_probs[0] if draft_probs is not None else torch.nn.functional.one_hot(drafts[0, 0], V).float()
    expected_rate = torch.minimum(p[0], q0).sum().item()
    assert abs(len(accepted) / n - expected_rate) < 0.015


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    logits = torch.randn(3, V)
    params = SamplingParams(temperature=1.0, seed=7)

    def run(extra: int):
        gens = [torch.Generator().manual_seed(7)] + [None] * extra
        all_logits = torch.cat([logits] + [torch.randn(3, V) for _ in range(extra)])
        return verify(all_logits, [[1, 2]] * (1 + extra), [params] * (1 + extra), gens).token_ids[0]

    assert run(0) == run(3)


def test_a_seeded_rows_later_steps_do_not_depend_on_the_other_rows_proposals():
    """A seeded row draws uniforms for its own proposals only: beside a row with more, it drew as many as that
    row had, and its next steps changed with the batch (the feature-combination fuzz: n-gram, max_num_seqs 4)."""
    params = SamplingParams(temperature=1.0, seed=7)
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(2, V, generator=g) for _ in range(4)]  # the seeded row's logits: one proposal a step

    def run(neighbour_k: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(7)
        tokens = []
        for logits in steps:
            rows, drafts = [logits], [[1]]
            if neighbour_k:
                rows.append(torch.randn(neighbour_k + 1, V, generator=g))
                drafts.append([2] * neighbour_k)
            tokens.append(verify(torch.cat(rows), drafts, [params] * len(drafts), [gen, None][: len(drafts)])
                          .token_ids[0])
        return tokens

    assert run(0) == run(4)


def test_mixed_batch_one_host_copy(monkeypatch):
    # greedy and random rows, k of 3, 0 and 2 in one batch: the step's inputs reach the device in one copy
    # (one to_device call), and each greedy row is what it gives alone
    from meshserve.spec_decode import rejection_sampler

    calls = []
    real = rejection_sampler.to_device
    monkeypatch.setattr(rejection_sampler, "to_device", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    torch.manual_seed(1)
    logits = torch.randn(4 + 1 + 3, V)
    am = logits.argmax(-1).tolist()
    drafts = [[am[0], (am[1] + 1) % V, am[2]], [], [am[5], am[6]]]
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8), SamplingParams(temperature=0)]
    res = rejection_sampler.verify(logits, drafts, params, [None] * 3)
    assert res.num_accepted[0] == 1 and res.token_ids[0] == [am[0], am[1]]
    assert res.num_accepted[1] == 0 and len(res.token_ids[1]) == 1
    assert res.num_accepted[2] == 2 and res.token_ids[2] == [am[5], am[6], am[7]]
    verify_copies = [c for c in calls if isinstance(c[0], list) and len(c[0]) == 3 + 3]
    assert len(verify_copies) == 1 and [row[:3] for row in verify_copies[0]] == [[3, 0, 1], [0, 4, 0], [2, 5, 1]]
