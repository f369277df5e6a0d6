"""On the GPU, mixed-step CUDA graphs (engine/mixed_graph.py) give the eager forward's outputs.

Chunked prefill over a small token budget makes most steps mixed (prefill chunks beside decode rows), so
with --max-cudagraph-tokens > 0 they replay padded graphs; with 0 they run eagerly.
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _llm(model: str, dtype: str, max_cudagraph_tokens: int, monkeypatch, **kw):
    from meshserve import LLM

    monkeypatch.delenv("MESHSERVE_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS", raising=False)
    return LLM(
        model=model,
        dtype=dtype,
        device="cuda",
        max_model_len=512,
        max_num_seqs=16,
        max_num_batched_tokens=64,
        enable_prefix_caching=False,
        num_gpu_blocks_override=1024,
        max_cudagraph_tokens=max_cudagraph_tokens,
        seed=0,
        **kw,
    )


def _prompts(n: int, vocab: int) -> list[dict]:
    rng = random.Random(0)
    return [
        {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(5, 150))]} for _ in range(n)
    ]


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_greedy_tokens_same_with_mixed_graphs_fp32(family, tiny_model_dir, monkeypatch):
    from meshserve import SamplingParams
    from tests.conftest import VOCAB

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = _prompts(8, VOCAB)
    eager = _llm(tiny_model_dir(family), "float32", 0, monkeypatch)
    assert eager.engine.runner.mixed_graphs is None and eager.engine.runner.graphs is not None
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    eager.shutdown()
    fast = _llm(tiny_model_dir(family), "float32", 512, monkeypatch)
    graphs = fast.engine.runner.mixed_graphs
    assert graphs is not None and graphs.buckets == [16, 32, 48, 64]  # capped at max_num_batched_tokens
    got = [o.outputs[0].token_ids for o in fast.generate(prompts, params, use_tqdm=False)]
    fast.shutdown()
    assert got == expected
    assert sum(graphs.runs.values()) >= 5 and graphs.padded_runs >= 1  # 8 prompts over 64-token steps: 8 ran


def test_mixed_graphs_bf16_logprobs_within_tolerance(monkeypatch):
    from meshserve import SamplingParams

    kw = {"load_format": "dummy", "hf_overrides": {"num_hidden_layers": 3}}
    # prompt logprobs come from the prefill chunks' rows, which ride in mixed steps
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=1, logprobs=1)
    prompts = _prompts(4, 10000)
    outs = []
    for tokens in (0, 512):
        llm = _llm("qwen3-0.6b", "bfloat16", tokens, monkeypatch, **kw)
        outs.append(llm.generate(prompts, params, use_tqdm=False))
        if tokens:
            assert sum(llm.engine.runner.mixed_graphs.runs.values()) >= 4
        llm.shutdown()
    # same kernels, other matmul shapes (padded rows): bf16 roundings move logprobs by hundredths
    tol = 0.1
    for a, b in zip(*outs):
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            tok = next(iter(pa))
            assert pb[tok].logprob == pytest.approx(pa[tok].logprob, abs=tol)
        best_a = max(lp.logprob for lp in a.outputs[0].logprobs[0].values())
        best_b = max(lp.logprob for lp in b.outputs[0].logprobs[0].values())
        assert best_b == pytest.approx(best_a, abs=tol)


def _batch(prefill: int, decode_ctx: list[int], seed: int, block_size: int, first_block: int = 1):
    """One prefill chunk and decode rows over their contexts, on distinct blocks from first_block."""
    from meshserve import SamplingParams
    from meshserve.engine.scheduler_output import ScheduledSequence
    from tests.conftest import VOCAB

    rng = random.Random(seed)
    params = SamplingParams(temperature=0)
    seqs, next_block = [], first_block
    for i, (n_new, ctx) in enumerate([(prefill, prefill)] + [(1, c) for c in decode_ctx]):
        n_blocks = -(-ctx // block_size)
        table = list(range(next_block, next_block + n_blocks))
        next_block += n_blocks
        ids = [rng.randrange(3, VOCAB) for _ in range(n_new)]
        seqs.append(ScheduledSequence(f"s{i}", ids, ctx - n_new, table, params, True))
    return seqs


@torch.inference_mode()
def test_two_batches_in_one_bucket_replay_like_eager(tiny_model_dir, monkeypatch):
    llm = _llm(tiny_model_dir("llama"), "float32", 512, monkeypatch)
    runner = llm.engine.runner
    graphs = runner.mixed_graphs
    batches = [
        _batch(20, [9, 40, 3], 1, runner.block_size),
        # on other blocks: its cache writes must not reach the first batch's contexts, which runs again
        _batch(7, [17] * 12 + [130], 2, runner.block_size, first_block=200),
    ]
    results = []
    for seqs in batches + batches[:1]:  # the first again, after the second overwrote the buffers
        input_ids, positions, meta = runner._prepare(seqs)
        assert graphs.bucket_for(input_ids.shape[0], meta.num_seqs) == 32
        eager = runner.forward(input_ids, positions, meta).clone()
        replayed = graphs.run(input_ids, positions, meta).clone()
        # fp32 dots run in TF32 on the GPU, and the graph's unified kernel tiles differently from the eager
        # prefill kernel: equal to TF32 rounding, not bit for bit (greedy tokens are equal: the test above)
        torch.testing.assert_close(replayed, eager, rtol=1e-2, atol=1e-2)
        results.append(replayed)
    assert graphs.runs[32] == 3
    torch.testing.assert_close(results[2], results[0], rtol=0, atol=0)
    llm.shutdown()
