"""The replay oracle of `bench spec --replay --replay-forced`: standing in for the target's argmax in
verification and in plain greedy rows, it makes the output follow the references (here: ids the model would
never pick) whichever steps verified, and the acceptance the error rate asked for, with async scheduling's
verify-ahead moving rows back on rejections. Without the oracle (fp32), the replay with injected errors at
batch > 1 gives the greedy output of the run without speculation, token for token, through mixed plain and
verify steps (issue 22: the H200's batch-64 'identical False' was the oracle missing from plain steps)."""

from __future__ import annotations

import itertools
import random

import pytest

from meshserve import LLM, SamplingParams
from meshserve.spec_decode.replay_proposer import ReplayOracle, ReplayProposer
from tests.conftest import VOCAB

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


def _prompts() -> list[dict]:
    rng = random.Random(7)
    return [{"prompt_token_ids": [i + 1] + [rng.randrange(3, VOCAB) for _ in range(12 + 5 * i)]} for i in range(3)]


def _references(prompts) -> dict[tuple[int, ...], list[int]]:
    """Random ids as each prompt's continuation: the model would not pick them."""
    rng = random.Random(11)
    return {tuple(p["prompt_token_ids"]): [rng.randrange(3, VOCAB) for _ in range(MAX_TOKENS + 8)]
            for p in prompts}


def _alternate(gate) -> None:
    """The gate's decision on, off, off, on, ... whatever it measures: plain and verify steps mixed."""
    pattern = itertools.cycle([True, False, False])
    gate.decide = lambda batch, context_tokens: next(pattern)


def _replay_llm(model, refs, error_rate: float, async_scheduling: bool, forced: bool, mixed: bool) -> LLM:
    llm = LLM(model=model, block_size=4, max_model_len=256, async_scheduling=async_scheduling,
              speculative_config=NGRAM)
    core = llm.engine.core
    proposer = ReplayProposer(refs, 3, error_rate, VOCAB)
    core.speculator.proposer = proposer
    if mixed:
        _alternate(core.speculator.gate)
    else:
        core.speculator.gate.step_model = None  # keep speculating whatever the acceptance (no plain step)
    if forced:
        runner = core.executor.runner
        runner.sampling.greedy_oracle = ReplayOracle(
            proposer, runner.device, prompt_of=lambda seq_id: core.requests[seq_id].prompt_token_ids)
    return llm


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("error_rate", [0.0, 0.4])
def test_forced_replay_follows_the_references(model, async_scheduling, error_rate, mixed):
    prompts = _prompts()
    refs = _references(prompts)
    llm = _replay_llm(model, refs, error_rate, async_scheduling, forced=True, mixed=mixed)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    stats = llm.engine.stats()
    llm.shutdown()
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == refs[tuple(p["prompt_token_ids"])][:MAX_TOKENS]
    drafted, accepted = stats["spec_num_draft_tokens"], stats["spec_num_accepted_tokens"]
    assert drafted > 0
    if error_rate == 0.0:
        assert accepted == drafted
    else:
        assert 0 < accepted < drafted


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_unforced_replay_with_errors_at_batch_8_is_greedy_exact(model, async_scheduling):
    rng = random.Random(5)
    prompts = [{"prompt_token_ids": [i + 1] + [rng.randrange(3, VOCAB) for _ in range(9 + 3 * i)]}
               for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    base = LLM(model=model, block_size=4, max_model_len=256)
    ref = [o.outputs[0].token_ids for o in base.generate(prompts, params, use_tqdm=False)]
    base.shutdown()
    refs = {tuple(p["prompt_token_ids"]): r + [0] * 8 for p, r in zip(prompts, ref)}
    llm = _replay_llm(model, refs, 0.4, async_scheduling, forced=False, mixed=True)
    out = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    stats = llm.engine.stats()
    llm.shutdown()
    assert out == ref
    assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]
