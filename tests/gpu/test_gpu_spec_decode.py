"""Speculative decoding on the GPU (Triton attention; decode graphs for plain decode steps, mixed-step graphs
for verify steps): greedy tokens equal decoding without speculation, with replayed proposals, and with the
verify steps replaying graphs or running eagerly."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _llm(**kw):
    from meshserve import LLM

    return LLM(
        model="qwen3-0.6b",
        load_format="dummy",
        dtype="float32",
        max_model_len=1024,
        hf_overrides={"num_hidden_layers": 3},
        gpu_memory_utilization=0.4,
        max_num_seqs=32,
        seed=0,
        **kw,
    )


def test_gpu_greedy_equal_with_replayed_proposals():
    from meshserve import SamplingParams
    from meshserve.spec_decode.replay_proposer import ReplayProposer

    rng = random.Random(0)
    prompts = [
        {"prompt_token_ids": [rng.randint(0, 10000) for _ in range(rng.randint(5, 300))]} for _ in range(6)
    ]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    ref = _llm()
    expected = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    ref.shutdown()
    llm = _llm(speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    llm.engine.core.speculator.proposer = ReplayProposer(
        {tuple(p["prompt_token_ids"]): e for p, e in zip(prompts, expected)}, 4, 0.2, 151936
    )
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    assert llm.engine.core.speculator.stats.acceptance_rate > 0.4
    llm.shutdown()


NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def _tiny(model: str, max_cudagraph_tokens: int, monkeypatch, **kw):
    from meshserve import LLM

    monkeypatch.delenv("MESHSERVE_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS", raising=False)
    return LLM(
        model=model,
        dtype="float32",
        device="cuda",
        max_model_len=512,
        max_num_seqs=4,
        enable_prefix_caching=False,
        num_gpu_blocks_override=1024,
        max_cudagraph_tokens=max_cudagraph_tokens,
        seed=0,
        **kw,
    )


def _spy_verify_steps(runner) -> dict[str, int]:
    """Counts verify steps (a row with proposals) and, of them, those the mixed-step graphs served."""
    counts = {"verify": 0, "graph": 0}
    current = {"verify": False}
    launch = runner.launch

    def spy_launch(out):
        current["verify"] = any(s.num_spec_tokens for s in out.scheduled)
        counts["verify"] += current["verify"]
        return launch(out)

    runner.launch = spy_launch
    graphs = runner.mixed_graphs
    if graphs is not None:
        run = graphs.run

        def spy_run(input_ids, positions, meta, intermediate=None):
            counts["graph"] += current["verify"]
            return run(input_ids, positions, meta, intermediate)

        graphs.run = spy_run
    return counts


def test_gpu_verify_steps_replay_mixed_graphs_fp32(tiny_model_dir, monkeypatch):
    """n-gram speculation with --max-cudagraph-tokens 0 (verify steps eager) and 1024 (replayed): the same
    greedy tokens in fp32 as each other and as decoding without speculation."""
    from meshserve import SamplingParams

    rng = random.Random(0)
    # a small alphabet, so the n-gram proposer finds matches; four sequences at a time, so later
    # prompts' prefill chunks ride beside earlier ones' verify rows
    prompts = [
        {"prompt_token_ids": [rng.randrange(3, 40) for _ in range(n)]} for n in (20, 41, 9, 33, 26, 70)
    ]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    model = tiny_model_dir("llama")
    ref = _tiny(model, 1024, monkeypatch)
    expected = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    ref.shutdown()
    outs, counts = [], []
    for tokens in (0, 1024):
        llm = _tiny(model, tokens, monkeypatch, speculative_config=NGRAM)
        runner = llm.engine.runner
        llm.engine.core.speculator.gate.step_model = None  # speculate on every step
        assert runner.graphs is not None and (runner.mixed_graphs is None) == (tokens == 0)
        if tokens:
            assert runner.mixed_graphs.replay and runner.mixed_graphs.buckets[-1] == 1024
        counts.append(_spy_verify_steps(runner))
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        assert llm.engine.stats()["spec_num_draft_tokens"] > 0
        if tokens:
            assert sum(runner.mixed_graphs.runs.values()) >= counts[-1]["verify"]
        llm.shutdown()
    assert outs[0] == outs[1] == expected
    eager, replayed = counts
    assert eager["verify"] >= 5 and eager["graph"] == 0
    assert replayed["verify"] >= 5 and replayed["graph"] == replayed["verify"]  # every verify step replayed


def test_gpu_batch_1_verify_bucket_fp32(tiny_model_dir, monkeypatch):
    """MESHSERVE_SPEC_VERIFY_BUCKET=1: one sequence's verify steps replay the k + 1 token graph, with the
    greedy tokens of decoding without speculation (fp32)."""
    from meshserve import SamplingParams
    from meshserve.engine.mixed_graph import SPEC_VERIFY_BUCKET_ENV
    from meshserve.spec_decode.replay_proposer import ReplayProposer
    from tests.conftest import VOCAB

    rng = random.Random(1)
    prompt = {"prompt_token_ids": [rng.randrange(3, 40) for _ in range(30)]}
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    model = tiny_model_dir("llama")
    ref = _tiny(model, 1024, monkeypatch)
    expected = ref.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    ref.shutdown()
    monkeypatch.setenv(SPEC_VERIFY_BUCKET_ENV, "1")
    llm = _tiny(model, 1024, monkeypatch, speculative_config=NGRAM)
    core, runner = llm.engine.core, llm.engine.runner
    k = core.speculator.gate.k
    core.speculator.gate.step_model = None
    refs = {tuple(prompt["prompt_token_ids"]): list(expected)}
    core.speculator.proposer = ReplayProposer(refs, k, 0.2, VOCAB)
    assert runner.mixed_graphs.buckets[0] == k + 1
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    runs = dict(runner.mixed_graphs.runs)
    llm.shutdown()
    assert list(out) == list(expected)
    assert runs.get(k + 1, 0) >= 5
