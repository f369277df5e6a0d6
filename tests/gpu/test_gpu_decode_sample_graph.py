"""On the GPU, decode graphs with the greedy head (DecodeGraphs sampled graphs, engine/cuda_graph.py) give the
plain path's tokens: the same generations with MESHSERVE_DECODE_SAMPLE_GRAPHS=0 (the plain decode graphs and
the sampler after them) and with the default (batch 1, 2, 4 and 8 replay forward + LM head + argmax), in fp32
on tiny models and in bf16 on Qwen3-0.6B's architecture (dummy weights) at W1's batch of one.
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _generate(model: str, dtype: str, sample_graphs: str, prompts, params, monkeypatch, **kw):
    from meshserve import LLM

    monkeypatch.setenv("MESHSERVE_DECODE_SAMPLE_GRAPHS", sample_graphs)
    llm = LLM(model=model, dtype=dtype, device="cuda", max_model_len=512, max_num_seqs=16,
              enable_prefix_caching=False, num_gpu_blocks_override=1024, seed=0, **kw)
    graphs = llm.engine.runner.graphs
    try:
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        return tokens, len(graphs.sampled_graphs), graphs.sampled_replays
    finally:
        llm.shutdown()


def _prompts(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(5, 100))]} for _ in range(n)]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_greedy_tokens_same_with_sampled_graphs_fp32(family, batch, tiny_model_dir, monkeypatch):
    from meshserve import SamplingParams
    from tests.conftest import VOCAB

    # uneven lengths: the batch shrinks through sizes with and without a sampled graph
    params = [SamplingParams(temperature=0, max_tokens=12 + 3 * i, ignore_eos=True) for i in range(batch)]
    prompts = _prompts(batch, VOCAB)
    expected, n_off, used_off = _generate(tiny_model_dir(family), "float32", "0", prompts, params, monkeypatch)
    got, n_on, used_on = _generate(tiny_model_dir(family), "float32", "8", prompts, params, monkeypatch)
    assert got == expected
    assert n_off == 0 and used_off == 0
    assert n_on >= 4 and used_on > 0


def test_w1_shape_bf16_same_tokens_and_sampler_rows_untouched(monkeypatch):
    """Qwen3-0.6B arch, bf16, dummy weights: a W1-like greedy generation replays sampled graphs and matches the
    plain path token for token; a sampled row beside it sends the step back to the sampler."""
    from meshserve import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompts = _prompts(1, 10000, seed=1)
    kw = {"load_format": "dummy"}
    expected, _, _ = _generate("qwen3-0.6b", "bfloat16", "0", prompts, greedy, monkeypatch, **kw)
    got, _, used = _generate("qwen3-0.6b", "bfloat16", "8", prompts, greedy, monkeypatch, **kw)
    assert got == expected and used == 47
    mixed = [greedy, SamplingParams(temperature=0.7, seed=5, max_tokens=48, ignore_eos=True)]
    two = _prompts(2, 10000, seed=2)
    expected, _, _ = _generate("qwen3-0.6b", "bfloat16", "0", two, mixed, monkeypatch, **kw)
    got, _, used = _generate("qwen3-0.6b", "bfloat16", "8", two, mixed, monkeypatch, **kw)
    assert got == expected and used == 0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_argmax_switch_same_tokens(family, tiny_model_dir, monkeypatch):
    """MESHSERVE_GREEDY_ARGMAX=1 (the sampler's Triton pass without noise for all-greedy steps: the sampled graphs'
    greedy head and StepSampler's plain greedy rows) gives torch's argmax's tokens: fp32 tiny models at batch 8
    shrinking through sizes with and without a sampled graph, and Qwen3-0.6B's architecture in bf16 at batch 1."""
    from meshserve import SamplingParams
    from tests.conftest import VOCAB

    params = [SamplingParams(temperature=0, max_tokens=12 + 3 * i, ignore_eos=True) for i in range(8)]
    prompts = _prompts(8, VOCAB, seed=3)
    runs = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("MESHSERVE_GREEDY_ARGMAX", switch)
        runs[switch] = _generate(tiny_model_dir(family), "float32", "8", prompts, params, monkeypatch)[0]
    assert runs["1"] == runs["0"]
    if family == "qwen3":
        greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
        one = _prompts(1, 10000, seed=4)
        for switch in ("0", "1"):
            monkeypatch.setenv("MESHSERVE_GREEDY_ARGMAX", switch)
            runs[switch] = _generate("qwen3-0.6b", "bfloat16", "8", one, greedy, monkeypatch, load_format="dummy")[0]
        assert runs["1"] == runs["0"]
