"""Decode graphs with the greedy head (DecodeGraphs sampled graphs) in the engine, on the CPU.

CUDA graphs cannot run here, so DecodeGraphs(replay=False) runs the forward (and, for a sampled graph, the LM
head and the argmax after it) eagerly on the padded static buffers; the runner takes the sampled graph for an
all-greedy decode step of exactly a captured size and keeps the plain sampler for everything else. Tokens
must be the plain path's in every case (tests/gpu/test_gpu_decode_sample_graph.py replays real graphs).
"""

from __future__ import annotations

import random

import pytest

from meshserve import LLM, SamplingParams
from meshserve.engine.cuda_graph import DecodeGraphs
from tests.conftest import VOCAB


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=tiny_model_dir("llama"), block_size=4, max_model_len=128, max_num_seqs=8,
               max_num_batched_tokens=64, enable_prefix_caching=False, seed=0)


def _with_decode_graphs(llm: LLM, sample_max_bs: int):
    """Install eager decode graphs (sampled ones up to sample_max_bs) on the runner; returns them."""
    runner = llm.engine.runner
    config = llm.engine.config
    graphs = DecodeGraphs(runner.forward, config.scheduler_config.max_num_seqs, config.scheduler_config.max_model_len,
                          runner.block_size, runner.device, sample_head=runner._greedy_head,
                          sample_max_bs=sample_max_bs, replay=False)
    runner.graphs = graphs
    return graphs


def _generate(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


CASES = {
    # all greedy: every decode step of a captured size (1, 2, 4) replays a sampled graph, a step of 3 the plain one
    "greedy batch 1": ([20], [SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)]),
    "greedy batch 4": ([9, 31, 14, 22], [SamplingParams(temperature=0, max_tokens=5 + i, ignore_eos=True)
                                         for i in range(4)]),
    # a batch of 3 pads to 4: the plain graph and the sampler, then sampled graphs at 2 and 1 as rows finish
    "greedy batch 3": ([9, 31, 14], [SamplingParams(temperature=0, max_tokens=4 + 2 * i, ignore_eos=True)
                                     for i in range(3)]),
    # one seeded sampled row beside greedy ones: the sampler for the whole step
    "mixed": ([12, 17], [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                         SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True)]),
    # greedy rows that ask for logprobs or carry penalties read the logits: the sampler
    "logprobs": ([12, 17], [SamplingParams(temperature=0, logprobs=2, max_tokens=5, ignore_eos=True)] * 2),
    "penalty": ([12], [SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=5, ignore_eos=True)]),
}
GREEDY = {"greedy batch 1", "greedy batch 4", "greedy batch 3"}


@pytest.mark.parametrize("case", list(CASES))
def test_tokens_same_as_the_plain_path(llm, case):
    lengths, params = CASES[case]
    prompts = [{"prompt_token_ids": _ids(40 + i, n)} for i, n in enumerate(lengths)]
    expected = _generate(llm, prompts, params)
    graphs = _with_decode_graphs(llm, sample_max_bs=4)
    plain_sizes = []
    run = graphs.run

    def spy(input_ids, positions, meta, intermediate=None):
        plain_sizes.append(meta.num_seqs)
        return run(input_ids, positions, meta, intermediate)

    graphs.run = spy
    try:
        got = _generate(llm, prompts, params)
    finally:
        llm.engine.runner.graphs = None
    assert got == expected
    if case in GREEDY:  # every decode step of a captured size took a sampled graph, the others the plain one
        assert graphs.sampled_replays > 0 and not set(plain_sizes) & graphs.sample_sizes
        assert case != "greedy batch 3" or 3 in plain_sizes  # padded to 4: the plain graph
    else:
        assert graphs.sampled_replays == 0 and plain_sizes


def test_off_without_sampled_sizes(llm):
    prompts = [{"prompt_token_ids": _ids(7, 11)}]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected = _generate(llm, prompts, params)
    graphs = _with_decode_graphs(llm, sample_max_bs=0)
    try:
        assert _generate(llm, prompts, params) == expected
    finally:
        llm.engine.runner.graphs = None
    assert graphs.sampled_replays == 0 and graphs.replays == 4


@pytest.mark.parametrize("oracle", [False, True])
def test_speculation_keeps_its_tokens(tiny_model_dir, oracle):
    """With speculation, verify steps keep the sampler while decode steps without proposals, and rows placed
    behind a verify step still in flight, may take sampled graphs: the greedy tokens are those of the plain
    path. Prompts of a small alphabet give the n-gram proposer matches; the oracle (ReplayProposer: the
    reference tokens of the first two prompts, 20% of them wrong) makes long accepted runs and rejections."""
    from meshserve.spec_decode.replay_proposer import ReplayProposer

    llm = LLM(model=tiny_model_dir("llama"), block_size=4, max_model_len=128, max_num_seqs=8,
              enable_prefix_caching=False, seed=0,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                  "prompt_lookup_max": 3})
    rng = random.Random(0)
    # two prompts that find n-gram matches, and one over the whole vocabulary that decodes on alone (no
    # proposals: plain decode steps) once they finish
    prompts = [{"prompt_token_ids": [rng.randrange(3, 40) for _ in range(20 + 7 * i)]} for i in range(2)]
    prompts.append({"prompt_token_ids": _ids(11, 9)})
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (10, 12, 40)]
    expected = _generate(llm, prompts, params)
    if oracle:
        llm.engine.core.speculator.proposer = ReplayProposer(
            {tuple(p["prompt_token_ids"]): o for p, o in zip(prompts[:2], expected)}, 3, 0.2, VOCAB, seed=1)
    drafts = llm.engine.stats()["spec_num_draft_tokens"]
    graphs = _with_decode_graphs(llm, sample_max_bs=4)
    try:
        got = _generate(llm, prompts, params)
        drafts = llm.engine.stats()["spec_num_draft_tokens"] - drafts
    finally:
        llm.engine.runner.graphs = None
    assert got == expected
    assert graphs.sampled_replays > 0
    assert drafts > 0  # proposals were made and verified beside the sampled graphs


def test_the_head_launches_without_pdl_on_request(llm, monkeypatch):
    """MESHSERVE_PDL_HEAD=0 (KernelSelection.sample_head_pdl False): the greedy head's kernels launch plain
    while the process switch has PDL on; by default they follow the switch."""
    import dataclasses

    import torch

    from meshserve.kernels import pdl

    runner = llm.engine.runner
    hidden = torch.zeros(1, llm.engine.config.model_config.hf_config.hidden_size)
    seen = []
    logits = runner.model.compute_logits
    monkeypatch.setattr(runner.model, "compute_logits", lambda h: seen.append(pdl.resolve(None)) or logits(h))
    with pdl.enabled():
        runner._greedy_head(hidden)
        monkeypatch.setattr(runner, "kernels", dataclasses.replace(runner.kernels, sample_head_pdl=False))
        assert runner._greedy_head(hidden).shape == (1,)
    assert seen == [True, False]
