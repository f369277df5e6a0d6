"""The replay oracle of `bench spec --replay --replay-forced`: standing in for the target's argmax in
verification, it makes the output follow the references (here: ids the model would never pick) and the
acceptance the error rate asked for, with async scheduling's verify-ahead moving rows back on rejections."""

from __future__ import annotations

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


def _references(model, prompts) -> dict[tuple[int, ...], list[int]]:
    """Each prompt's first two greedy tokens (plain steps sample them, not the oracle: the prefill's, and
    under async scheduling the step scheduled before it was read), then random ids."""
    llm = LLM(model=model, block_size=4, max_model_len=256)
    head = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2),
                                                        use_tqdm=False)]
    llm.shutdown()
    rng = random.Random(11)
    return {tuple(p["prompt_token_ids"]): h + [rng.randrange(3, VOCAB) for _ in range(MAX_TOKENS + 8)]
            for p, h in zip(prompts, head)}


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("error_rate", [0.0, 0.4])
def test_forced_replay_follows_the_references(model, async_scheduling, error_rate):
    prompts = _prompts()
    refs = _references(model, prompts)
    llm = LLM(model=model, block_size=4, max_model_len=256, async_scheduling=async_scheduling,
              speculative_config=NGRAM)
    core = llm.engine.core
    proposer = ReplayProposer(refs, 3, error_rate, VOCAB)
    core.speculator.proposer = proposer
    core.speculator.gate.step_model = None  # keep speculating whatever the acceptance (no plain step)
    runner = core.executor.runner
    runner.sampling.greedy_oracle = ReplayOracle(proposer, runner.device)
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
