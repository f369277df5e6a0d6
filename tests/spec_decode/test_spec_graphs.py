"""Speculative decoding's verify steps through the mixed-step graphs' padded buffers, on the CPU.

CUDA graphs cannot run here, so MixedStepGraphs(replay=False) runs the forward eagerly on the padded static
buffers with the padded metadata (tests/engine/test_mixed_graph.py). A verify step (k + 1 query tokens per
verifying row) must take them, never the decode graphs, and the rejection sampler must read only the real
rows: greedy tokens equal the plain path's and decoding without speculation (tests/gpu/test_gpu_spec_decode.py
replays real graphs).
"""

from __future__ import annotations

import random

import pytest

from meshserve import LLM, SamplingParams
from meshserve.engine.cuda_graph import DecodeGraphs
from meshserve.spec_decode.replay_proposer import ReplayProposer
from tests.conftest import VOCAB

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def _llm(model: str, **kw) -> LLM:
    # three sequences at a time over a 48-token budget: later prompts' prefill chunks ride beside earlier
    # ones' verify rows
    return LLM(
        model=model,
        block_size=4,
        max_model_len=256,
        max_num_seqs=3,
        max_num_batched_tokens=48,
        enable_prefix_caching=False,
        seed=0,
        **kw,
    )


def _prompts() -> list[dict]:
    rng = random.Random(0)
    # a small alphabet, so the n-gram proposer finds matches in the prompt
    return [{"prompt_token_ids": [rng.randrange(3, 40) for _ in range(n)]} for n in (20, 41, 9, 33, 26)]


def _greedy(llm: LLM, prompts: list[dict]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


class _Routes:
    """Which forward served each step: the mixed graphs (padded, replay=False) or the decode graphs (an
    uncaptured DecodeGraphs whose run() is the plain forward), and whether the step verified proposals."""

    def __init__(self, runner):
        self.steps: list[tuple[str, bool]] = []  # (route, verify step)
        self.verify_steps = 0
        self.verify_with_prefill = 0  # verify steps that also carry a prefill chunk
        self.verify_behind = 0  # verify steps with a row behind a verify step in flight (async scheduling)
        self._verify = False
        self.mixed = runner.build_mixed_graphs(replay=False)
        self.decode = DecodeGraphs(runner.forward, 3, 256, runner.block_size, runner.device)
        self.verify_metas = []  # the metadata of verify steps
        real_launch, real_mixed = runner.launch, self.mixed.run

        def launch(out):
            self._verify = any(s.num_spec_tokens for s in out.scheduled)
            self.verify_steps += self._verify
            self.verify_with_prefill += self._verify and any(
                s.num_new_tokens > 1 + s.num_spec_tokens for s in out.scheduled
            )
            self.verify_behind += self._verify and any(
                s.num_spec_tokens and s.num_unverified_tokens for s in out.scheduled
            )
            return real_launch(out)

        def mixed(input_ids, positions, meta, intermediate=None):
            self.steps.append(("mixed", self._verify))
            if self._verify:
                self.verify_metas.append(meta)
            hidden = real_mixed(input_ids, positions, meta, intermediate)
            assert hidden.shape[0] == input_ids.shape[0]  # the real rows only, whatever the bucket
            return hidden

        def decode(input_ids, positions, meta, intermediate=None):
            self.steps.append(("decode", self._verify))
            return runner.forward(input_ids, positions, meta, intermediate)

        runner.launch, self.mixed.run, self.decode.run = launch, mixed, decode
        runner.graphs, runner.mixed_graphs = self.decode, self.mixed

    def count(self, route: str, verify: bool) -> int:
        return self.steps.count((route, verify))


@pytest.fixture(scope="module")
def expected(tiny_model_dir) -> list[list[int]]:
    plain = _llm(tiny_model_dir("llama"))
    tokens = _greedy(plain, _prompts())
    plain.shutdown()
    return tokens


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_verify_steps_take_padded_mixed_graphs_with_equal_greedy_tokens(tiny_model_dir, expected, async_scheduling):
    model = tiny_model_dir("llama")
    prompts = _prompts()
    llm = _llm(model, speculative_config=NGRAM, async_scheduling=async_scheduling)
    assert _greedy(llm, prompts) == expected  # the eager path, as before
    runner, core = llm.engine.runner, llm.engine.core
    core.speculator.gate.step_model = None  # speculate on every step (the gate is not under test here)
    assert runner.mixed_graphs is None  # CPU: no captured graphs, so the spies below stand in
    routes = _Routes(runner)
    try:
        assert _greedy(llm, prompts) == expected  # n-gram proposals
        ngram_verify = routes.verify_steps
        # proposals that replay the expected tokens with mistakes: long accepted runs and rejections
        core.speculator.proposer = ReplayProposer(
            {tuple(p["prompt_token_ids"]): e for p, e in zip(prompts, expected)}, 3, 0.2, VOCAB
        )
        accepted_before = core.speculator.stats.num_accepted_tokens
        assert _greedy(llm, prompts) == expected
    finally:
        runner.graphs = runner.mixed_graphs = None
    assert ngram_verify >= 3 and routes.verify_steps - ngram_verify >= 5
    if async_scheduling:  # verify rows placed on the device behind verify steps in flight
        assert routes.verify_behind >= 2
    else:  # prefill chunks beside verify rows, in one padded step (async: the finishes fall elsewhere)
        assert routes.verify_with_prefill >= 2
    assert core.speculator.stats.num_accepted_tokens - accepted_before >= 20
    # every verify step went through the padded buffers (each fits a bucket: at most 48 tokens), none
    # through the decode graphs, which still took the decode-only steps
    assert routes.count("mixed", True) == routes.verify_steps
    assert routes.count("decode", True) == 0 and routes.count("decode", False) >= 5
    assert routes.count("mixed", False) >= 3  # prompt prefill steps without verify rows
    assert not any(routes.decode.can_run(m) for m in routes.verify_metas)
    assert routes.mixed.padded_runs >= routes.verify_steps // 2 and len(routes.mixed.runs) >= 2
    assert core.scheduler.block_manager.num_free_blocks == core.scheduler.block_manager.num_blocks
    llm.shutdown()


def test_draft_model_verify_steps_take_padded_mixed_graphs(tiny_model_dir, expected):
    """The draft model's own forwards stay eager; the target's verify steps of its proposals take the
    padded buffers like the n-gram proposer's."""
    # the target as its own draft: proposals accepted, so verify steps keep long runs
    draft = {"method": "draft_model", "model": tiny_model_dir("llama"), "num_speculative_tokens": 2}
    llm = _llm(tiny_model_dir("llama"), speculative_config=draft)
    runner = llm.engine.runner
    llm.engine.core.speculator.gate.step_model = None
    routes = _Routes(runner)
    try:
        assert _greedy(llm, _prompts()) == expected
    finally:
        runner.graphs = runner.mixed_graphs = None
    assert routes.verify_steps >= 10 and routes.verify_with_prefill >= 1
    assert routes.count("mixed", True) == routes.verify_steps and routes.count("decode", True) == 0
    assert llm.engine.core.speculator.stats.acceptance_rate > 0.9
    llm.shutdown()


def test_verify_bucket_switch_adds_a_k_plus_1_bucket(monkeypatch):
    from meshserve.engine.mixed_graph import SPEC_VERIFY_BUCKET_ENV, verify_bucket

    assert verify_bucket(4, [16, 32]) == [16, 32]  # off by default
    monkeypatch.setenv(SPEC_VERIFY_BUCKET_ENV, "1")
    assert verify_bucket(4, [16, 32]) == [5, 16, 32]
    assert verify_bucket(None, [16, 32]) == [16, 32] and verify_bucket(15, [16, 32]) == [16, 32]


def test_batch_1_verify_steps_replay_the_k_plus_1_bucket(tiny_model_dir, monkeypatch):
    """MESHSERVE_SPEC_VERIFY_BUCKET=1: one sequence's verify steps (k + 1 = 4 tokens) take the 4-token bucket
    of the padded buffers, not the 16-token one, and the greedy tokens stay those without speculation."""
    from meshserve.engine.mixed_graph import SPEC_VERIFY_BUCKET_ENV

    model = tiny_model_dir("llama")
    prompts = _prompts()[:1]
    plain = _llm(model)
    expected = _greedy(plain, prompts)
    plain.shutdown()
    monkeypatch.setenv(SPEC_VERIFY_BUCKET_ENV, "1")
    llm = _llm(model, speculative_config=NGRAM)
    runner, core = llm.engine.runner, llm.engine.core
    core.speculator.gate.step_model = None
    refs = {tuple(prompts[0]["prompt_token_ids"]): expected[0]}
    core.speculator.proposer = ReplayProposer(refs, 3, 0.2, VOCAB)
    routes = _Routes(runner)
    try:
        assert routes.mixed.buckets[:2] == [4, 16]
        assert _greedy(llm, prompts) == expected
    finally:
        runner.graphs = runner.mixed_graphs = None
    assert routes.verify_steps >= 5 and routes.mixed.runs[4] == routes.verify_steps
    llm.shutdown()
