"""Speculative decoding in the engine: greedy output identical to decoding without it (n-gram proposals, and
an replay proposer that proposes the reference with mistakes, so long runs get accepted and rejected),
with preemption, prefix hits, n > 1, stops inside accepted runs; KV rollback; sampling; metrics."""

from __future__ import annotations

import random

import pytest

from meshserve import LLM, SamplingParams
from meshserve.errors import InvalidArgumentError
from meshserve.spec_decode.replay_proposer import ReplayProposer
from meshserve.spec_decode.stats import SpecDecodeStats
from tests.conftest import VOCAB

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def _prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    # a small alphabet, so the n-gram proposer finds matches in the prompt
    return [{"prompt_token_ids": [rng.randrange(3, 40) for _ in range(20 + 7 * i)]} for i in range(n)]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(model):
    llm = LLM(model=model, block_size=4, max_model_len=256)

    def run(prompts, params):
        return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]

    return run


def _spec_llm(model, **kwargs):
    return LLM(model=model, block_size=4, max_model_len=256, speculative_config=NGRAM, **kwargs)


def _with_oracle(llm, prompts, outputs, k=3):
    core = llm.engine.core
    core.speculator.stats = SpecDecodeStats()
    # replays the reference output, every proposed token wrong with probability 0.2 (seed 1: 7 of the first
    # 33 positions; seed 0 draws one, which async scheduling's proposals can step over)
    core.speculator.proposer = ReplayProposer(
        {tuple(p["prompt_token_ids"]): o[0] for p, o in zip(prompts, outputs)}, k, 0.2, VOCAB, seed=1
    )
    return core


def test_greedy_equal_with_ngram_and_oracle_proposals(model, reference):
    prompts = _prompts(5)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = reference(prompts, params)
    llm = _spec_llm(model)
    assert [
        [c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)
    ] == expected
    assert llm.engine.stats()["spec_num_draft_tokens"] > 0  # the n-gram proposer did propose

    core = _with_oracle(llm, prompts, expected)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in out] == expected
    stats = core.speculator.stats
    assert 0.5 < stats.acceptance_rate < 1.0  # long accepted runs, and rejections
    assert stats.mean_acceptance_length > 2.0
    assert core.scheduler.block_manager.num_free_blocks == core.scheduler.block_manager.num_blocks


def test_preemption_prefix_hits_and_n(model, reference):
    shared = _prompts(1, seed=3)[0]["prompt_token_ids"]
    prompts = [{"prompt_token_ids": shared + [5 + i, 6, 7]} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, n=2)
    expected = reference(prompts, params)
    # 40 blocks of 4 tokens cannot hold 8 sequences of ~65 tokens: they preempt each other
    llm = _spec_llm(model, num_gpu_blocks_override=40)
    core = _with_oracle(llm, prompts, expected)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in out] == expected
    stats = llm.engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert core.speculator.stats.num_accepted_tokens > 0


def test_stops_inside_an_accepted_run_truncate_it(model, reference):
    prompt = _prompts(1, seed=5)
    free = reference(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0][0]
    stop_tok = free[7]
    llm = _spec_llm(model)
    _with_oracle(llm, prompt, [[free]], k=6)
    cut = free.index(stop_tok)
    out = llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_tok], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids == free[: cut + 1] and out.finish_reason == "stop"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=11, ignore_eos=True), use_tqdm=False)[
        0
    ].outputs[0]
    assert out.token_ids == free[:11] and out.finish_reason == "length"
    # a stop string inside an accepted run (text is the front end's: it truncates and aborts)
    text = (
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
        .outputs[0]
        .text
    )
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    out = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert out.text == text[: text.index(stop)] and out.finish_reason == "stop"


def test_rejected_kv_is_rolled_back(model):
    """After each verify step a sequence holds exactly the blocks of its computed tokens (plus none)."""
    llm = _spec_llm(model)
    core = llm.engine.core
    prompt = _prompts(1, seed=9)[0]
    core.speculator.proposer = type(
        "Wrong", (), {"propose_for": lambda self, seq, skip=0: [1] * 3}
    )()  # always wrong
    engine = llm.engine
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    bm = core.scheduler.block_manager
    verified_steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        seq = core.scheduler.seqs.get("r")
        if seq is not None and seq.num_output_tokens > 1:
            assert len(bm.block_table(seq)) == bm.blocks_needed(seq.num_computed_tokens)
            verified_steps += 1
    assert verified_steps > 0 and core.speculator.stats.num_accepted_tokens == 0
    assert bm.num_free_blocks == bm.num_blocks


def test_sampling_with_speculation_is_seeded_and_mixed_with_other_settings(model):
    prompts = _prompts(3, seed=11)
    llm = _spec_llm(model)
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, max_tokens=20, seed=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, logprobs=2, ignore_eos=True),  # one token per step
        SamplingParams(temperature=1.0, max_tokens=20, repetition_penalty=1.2, ignore_eos=True),
    ]
    a = llm.generate(prompts, params, use_tqdm=False)
    b = llm.generate(prompts, params, use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids  # seeded
    assert all(len(o.outputs[0].token_ids) == 20 for o in a)
    assert len(a[1].outputs[0].logprobs) == 20


@pytest.mark.parametrize(
    "config, message",
    [
        ({"method": "lookahead", "num_speculative_tokens": 2}, "unsupported method"),
        ({"method": "eagle", "model": "/x", "num_speculative_tokens": 2}, "not supported yet"),
        ({"method": "eagle3", "model": "/x", "num_speculative_tokens": 2}, "not an EAGLE-3 checkpoint folder"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens: must be in [1, 32]"),
        ({"method": "ngram"}, "num_speculative_tokens: is required"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
            "prompt_lookup_max: must be >= prompt_lookup_min",
        ),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a model"),
        ({"method": "ngram", "num_speculative_tokens": 2, "k": 1}, "unknown key(s) k"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_speculative_configs_are_one_line_errors(model, config, message):
    with pytest.raises(InvalidArgumentError) as e:
        LLM(model=model, speculative_config=config)
    assert message in str(e.value) and "\n" not in str(e.value)
