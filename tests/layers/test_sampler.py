"""Sampler behaviour: greedy, seeded sampling, top-k/top-p/min-p, penalties, banned ids, logprobs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from meshserve.layers.sampler import (
    Sampler,
    SamplingMetadata,
    _temperature_only,
    apply_allowed,
    apply_penalties,
    compute_logprobs,
)
from meshserve.sampling import SamplingParams

V = 32


def build(
    params: list[SamplingParams],
    vocab_size: int = V,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    banned: list[list[int]] | None = None,
) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.build(
        params,
        prompts if prompts is not None else [[] for _ in range(n)],
        outputs if outputs is not None else [[] for _ in range(n)],
        generators if generators is not None else [None] * n,
        vocab_size,
        "cpu",
        banned,
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_set(logits_row: torch.Tensor, params: SamplingParams, n: int = 400, **kw) -> set[int]:
    """Tokens sampled from `n` copies of one row, each row drawing from one fixed generator."""
    g = gen(1234)
    meta = build([params] * n, vocab_size=logits_row.numel(), generators=[g] * n, **kw)
    out = Sampler()(logits_row.unsqueeze(0).repeat(n, 1), meta)
    return set(out.sampled_token_ids.tolist())


def log_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float32)


# -- greedy -------------------------------------------------------------------------------------------
def test_greedy_is_argmax() -> None:
    logits = torch.randn(8, V, generator=gen(0))
    out = Sampler()(logits, build([SamplingParams(temperature=0.0)] * 8))
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    assert out.sampled_token_ids.dtype == torch.int64
    assert out.logprobs is None and out.ranks is None and out.top_token_ids is None


def test_greedy_ties_pick_first_index() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    out = Sampler()(logits, build([SamplingParams(temperature=0.0)] * 2, vocab_size=4))
    assert out.sampled_token_ids.tolist() == [1, 0]


def test_mixed_batch_greedy_rows_stay_argmax_and_input_untouched() -> None:
    logits = torch.randn(4, V, generator=gen(1))
    before = logits.clone()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=0.0, top_k=3), SamplingParams(temperature=2.0, top_k=5)]
    out = Sampler()(logits, build(params))
    assert out.sampled_token_ids[0] == logits[0].argmax()
    assert out.sampled_token_ids[2] == logits[2].argmax()
    assert torch.equal(logits, before)


# -- seeded sampling ---------------------------------------------------------------------------------
def _run_steps(rows: list[tuple[SamplingParams, int | None]], target: int, steps: int = 6) -> list[int]:
    """Sample `steps` steps for a batch; every row sees the same per-step logits of its own. Returns the
    tokens of row `target`. Fresh generators each call, so runs are comparable."""
    gens = [gen(seed) if seed is not None else None for _, seed in rows]
    meta = build([p for p, _ in rows], generators=gens)
    step_logits = torch.randn(steps, V, generator=gen(99))
    tokens = []
    for s in range(steps):
        # Each row gets a different, but step-determined, logits row; the target row's does not depend on
        # its position in the batch.
        logits = torch.stack([step_logits[s] + (0.0 if i == target else float(i)) for i in range(len(rows))])
        tokens.append(int(Sampler()(logits, meta).sampled_token_ids[target]))
    return tokens


@pytest.mark.parametrize("seeded", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.7, top_p=0.9, top_k=20, min_p=0.01)])
def test_seeded_row_independent_of_batch(seeded: SamplingParams) -> None:
    alone = _run_steps([(seeded, 7)], target=0)
    batch_a = [(SamplingParams(temperature=1.0), None), (seeded, 7), (SamplingParams(temperature=0.0), None)]
    batch_b = [(SamplingParams(temperature=0.0), 3), (SamplingParams(temperature=1.5, top_p=0.3), 5),
               (SamplingParams(temperature=1.0, top_k=2, min_p=0.2), None), (seeded, 7)]
    assert _run_steps(batch_a, target=1) == alone
    assert _run_steps(batch_b, target=3) == alone
    # The seed matters: another seed gives another sequence (6 steps over a wide distribution).
    assert _run_steps([(seeded, 8)], target=0) != alone


def test_greedy_row_does_not_consume_its_generator() -> None:
    g = gen(5)
    meta = build([SamplingParams(temperature=0.0, seed=5)], generators=[g])
    assert meta.generators == {}
    Sampler()(torch.randn(1, V), meta)
    assert torch.equal(g.get_state(), gen(5).get_state())


# -- top-k / top-p / min-p -----------------------------------------------------------------------------
@pytest.mark.parametrize("other_top_p", [None, 0.99])
def test_top_k_keeps_exactly_k(other_top_p: float | None) -> None:
    # Nearly flat but distinct logits: the top 3 are the last 3 ids and all are likely.
    row = torch.arange(V, dtype=torch.float32) * 1e-3
    n = 300
    params = [SamplingParams(top_k=3)] * n
    if other_top_p is not None:  # forces the sort-based path instead of the top-k-only one
        params = params + [SamplingParams(top_p=other_top_p)]
    meta = build(params, generators=[gen(42)] * len(params))
    out = Sampler()(row.repeat(len(params), 1), meta)
    assert set(out.sampled_token_ids[:n].tolist()) == {V - 1, V - 2, V - 3}


def test_top_k_disabled_and_clamped() -> None:
    meta = build([SamplingParams(top_k=-1), SamplingParams(top_k=0), SamplingParams(top_k=10 * V),
                  SamplingParams(top_k=4)])
    assert meta.top_k.tolist() == [0, 0, V, 4]
    assert not meta.no_top_k
    assert build([SamplingParams(top_k=-1), SamplingParams(top_k=10 * V)]).no_top_k
    row = torch.zeros(V)
    assert len(sample_set(row, SamplingParams(top_k=-1))) > V // 2


PROBS = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize("top_p,allowed", [(0.01, {0}), (0.4, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}),
                                           (1.0, {0, 1, 2, 3})])
def test_top_p_mask(top_p: float, allowed: set[int]) -> None:
    assert sample_set(log_probs(PROBS), SamplingParams(top_p=top_p), n=600) == allowed


@pytest.mark.parametrize("min_p,allowed", [(0.35, {0, 1}), (0.2, {0, 1, 2}), (0.05, {0, 1, 2, 3}),
                                           (1.0, {0})])
def test_min_p_mask(min_p: float, allowed: set[int]) -> None:
    assert sample_set(log_probs(PROBS), SamplingParams(min_p=min_p), n=600) == allowed


def test_temperature_applies_before_min_p() -> None:
    # Token 1 has 0.6x the top prob at temperature 1, but only 0.36x at temperature 0.5.
    assert sample_set(log_probs(PROBS), SamplingParams(temperature=1.0, min_p=0.4)) == {0, 1}
    assert sample_set(log_probs(PROBS), SamplingParams(temperature=0.5, min_p=0.4)) == {0}


# -- penalties ---------------------------------------------------------------------------------------
def test_apply_penalties_formulas() -> None:
    vocab = 6
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0]] * 4)
    params = [
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(presence_penalty=0.5),
        SamplingParams(frequency_penalty=0.25),
        SamplingParams(),  # no penalties: untouched
    ]
    prompts = [[0, 1, 1], [0, 1], [0], [0, 1, 2]]
    outputs = [[3, 2], [2, 2, 4], [2, 2, 2, 4], [3, 4]]
    meta = build(params, vocab_size=vocab, prompts=prompts, outputs=outputs)
    got = apply_penalties(logits.clone(), meta)

    expected = logits.clone()
    # Repetition: every token of prompt or output; positive logits divided, others multiplied.
    for t in (0, 1, 3, 2):
        x = expected[0, t].item()
        expected[0, t] = x / 2.0 if x > 0 else x * 2.0
    # Presence: once per distinct output token, prompt ignored.
    for t in (2, 4):
        expected[1, t] -= 0.5
    # Frequency: count in the output, prompt ignored.
    expected[2, 2] -= 0.25 * 3
    expected[2, 4] -= 0.25 * 1
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_penalty_ids_padded_and_skipped_when_unused() -> None:
    meta = build([SamplingParams(), SamplingParams()], prompts=[[1, 2], [3]], outputs=[[4], []])
    assert meta.no_penalties and meta.prompt_token_ids is None and meta.output_token_ids is None
    meta = build([SamplingParams(frequency_penalty=1.0), SamplingParams(presence_penalty=0.1)],
                 prompts=[[1, 2, 3], [5]], outputs=[[4], []])
    assert not meta.no_penalties
    assert meta.prompt_token_ids.tolist() == [[1, 2, 3], [5, V, V]]
    assert meta.output_token_ids.tolist() == [[4], [V]]


def test_penalties_change_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    meta = build([SamplingParams(temperature=0.0, repetition_penalty=2.0)], vocab_size=4,
                 prompts=[[0]], outputs=[[]])
    assert Sampler()(logits, meta).sampled_token_ids.tolist() == [1]


# -- banned ids --------------------------------------------------------------------------------------
def test_banned_ids_never_sampled() -> None:
    row = torch.zeros(8)
    row[3] = 10.0  # the overwhelming favourite, but banned
    row[5] = 9.0
    assert sample_set(row, SamplingParams(), banned=[[3, 5]] * 400) == {0, 1, 2, 4, 6, 7}
    logits = row.repeat(2, 1)
    meta = build([SamplingParams(temperature=0.0)] * 2, vocab_size=8, banned=[[3], []])
    assert Sampler()(logits, meta).sampled_token_ids.tolist() == [5, 3]
    assert build([SamplingParams()] * 2, banned=[[], []]).banned_token_ids is None


# -- allowed ids -------------------------------------------------------------------------------------
def test_allowed_ids_are_the_only_ones_sampled() -> None:
    row = torch.zeros(8)
    row[3] = 10.0  # the overwhelming favourite, not allowed
    assert sample_set(row, SamplingParams(allowed_token_ids=[1, 6])) == {1, 6}
    logits = row.repeat(3, 1)
    logits[2, 6] = 5.0
    params = [SamplingParams(temperature=0.0, allowed_token_ids=[0, 1]), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, allowed_token_ids=[2, 6])]
    # row 1 has no list: untouched; the others take their best allowed id
    assert Sampler()(logits, build(params, vocab_size=8)).sampled_token_ids.tolist() == [0, 3, 6]


def test_allowed_mask_keeps_the_allowed_logits_and_is_off_when_unused() -> None:
    logits = torch.randn(2, V, generator=gen(5))
    masked = apply_allowed(logits.clone(), [[4, 9], None])
    assert torch.equal(masked[1], logits[1])
    kept = torch.isfinite(masked[0]).nonzero().flatten().tolist()
    assert kept == [4, 9] and torch.equal(masked[0, [4, 9]], logits[0, [4, 9]])
    assert build([SamplingParams()] * 2).allowed_token_ids is None
    # the fused temperature-only path stays open without the list, closed with it
    assert _temperature_only(build([SamplingParams()]))
    assert not _temperature_only(build([SamplingParams(allowed_token_ids=[1])]))


# -- logprobs ----------------------------------------------------------------------------------------
def test_sampler_logprobs_from_raw_logits() -> None:
    logits = torch.randn(5, V, generator=gen(3))
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.8, logprobs=5),
              SamplingParams(temperature=1.0, repetition_penalty=1.5, top_k=4),
              SamplingParams(temperature=0.0, presence_penalty=1.0, logprobs=0),
              SamplingParams(temperature=1.3, top_p=0.5, min_p=0.1)]
    meta = build(params, prompts=[[1, 2]] * 5, outputs=[[3, 3]] * 5, generators=[gen(i) for i in range(5)],
                 banned=[[0], [], [1], [], []])
    assert meta.max_num_logprobs == 5
    out = Sampler()(logits, meta)
    ref = torch.log_softmax(logits, dim=-1)  # raw: no penalties, temperature or masks
    ids = out.sampled_token_ids
    torch.testing.assert_close(out.logprobs, ref.gather(1, ids.unsqueeze(1)).squeeze(1))
    for i in range(5):
        assert out.ranks[i].item() == int((ref[i] > ref[i, ids[i]]).sum()) + 1
    assert out.top_token_ids.shape == (5, 5) and out.top_logprobs.shape == (5, 5)
    torch.testing.assert_close(out.top_logprobs, ref.gather(1, out.top_token_ids))
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    assert torch.equal(out.top_token_ids, ref.argsort(dim=-1, descending=True)[:, :5])
    assert out.ranks[0].item() == 1  # greedy without penalties picks the rank-1 token


def test_zero_logprobs_gives_zero_columns() -> None:
    out = Sampler()(torch.randn(2, V), build([SamplingParams(logprobs=0), SamplingParams()]))
    assert out.top_token_ids.shape == (2, 0) and out.top_logprobs.shape == (2, 0)
    assert out.logprobs.shape == (2,) and out.ranks.dtype == torch.int64


def test_compute_logprobs_matches_manual() -> None:
    logits = torch.randn(7, 11, generator=gen(4)).to(torch.bfloat16)
    logits[2, 4] = logits[2, 9] = 8.0  # a tie at the top
    token_ids = torch.tensor([0, 3, 9, 10, 5, 5, 1])
    lp, ranks, top_ids, top_lp = compute_logprobs(logits, token_ids, 3)
    assert lp.dtype == torch.float32 and top_lp.dtype == torch.float32
    for t in range(7):
        row = [float(x) for x in logits[t].float()]
        norm = math.log(sum(math.exp(x) for x in row))
        manual = [x - norm for x in row]
        assert lp[t].item() == pytest.approx(manual[token_ids[t]], abs=1e-5)
        assert ranks[t].item() == sum(x > manual[token_ids[t]] for x in manual) + 1
        best = sorted(manual, reverse=True)[:3]
        assert top_lp[t].tolist() == pytest.approx(best, abs=1e-5)
        assert [manual[i] for i in top_ids[t].tolist()] == pytest.approx(best, abs=1e-5)
    assert ranks[2].item() == 1  # tied for first: shares rank 1


def test_fast_path_flags() -> None:
    meta = build([SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)])
    assert meta.all_greedy and not meta.all_random
    assert meta.no_top_p and meta.no_top_k and meta.no_min_p and meta.no_penalties
    assert meta.temperature.tolist() == [0.0]
    meta = build([SamplingParams(top_p=0.5), SamplingParams(min_p=0.1)])
    assert meta.all_random and not meta.all_greedy
    assert not meta.no_top_p and meta.no_top_k and not meta.no_min_p


def test_argmax_takes_the_triton_pass_when_switched_on_and_fitting(monkeypatch) -> None:
    """Sampler.argmax (plain greedy rows: StepSampler's, the decode graphs' greedy head): the sampler's Triton
    pass without noise when the switch is on, the logits are on a GPU (here faked: the kernel runs in the CPU
    interpreter) and fit (<= 64 rows), torch's argmax otherwise; the same ids either way."""
    pytest.importorskip("triton")
    from meshserve.kernels import triton_sampling
    from meshserve.layers import sampler as sampler_module

    calls = []
    kernel = triton_sampling.greedy_argmax
    monkeypatch.setattr(triton_sampling, "greedy_argmax", lambda x: calls.append(x.shape[0]) or kernel(x))
    monkeypatch.setattr(sampler_module, "fused_ops_for", lambda x, enabled: object() if enabled else None)
    g = torch.Generator().manual_seed(0)
    for rows in (1, 64, 65):
        logits = torch.randn(rows, 3000, generator=g)
        assert torch.equal(Sampler(greedy_argmax=True).argmax(logits), logits.argmax(-1))
        assert torch.equal(Sampler(fused=True).argmax(logits), logits.argmax(-1))
    assert calls == [1, 64]  # 65 rows: torch's; switched off: torch's


def test_plain_greedy_rows_take_the_samplers_argmax(monkeypatch) -> None:
    from meshserve.engine import step_sampler

    seen = []
    sampler = Sampler(greedy_argmax=True)
    monkeypatch.setattr(sampler, "argmax", lambda x: seen.append(x.shape) or x.argmax(-1))
    logits = torch.randn(3, V)
    rows = [SimpleNamespace(params=SamplingParams(temperature=0)) for _ in range(3)]
    ids, out = step_sampler.sample_rows(sampler, logits, rows, [[], [], []], lambda s: None, V, torch.device("cpu"))
    assert out is None and ids.tolist() == logits.argmax(-1).tolist() and seen == [(3, V)]
