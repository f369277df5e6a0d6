"""Greedy tokens must equal HF transformers generate, under every scheduling regime the engine has."""

from __future__ import annotations

import random

import pytest
import torch

from meshserve import LLM, SamplingParams
from tests.conftest import FAMILIES, VOCAB

MAX_NEW = 12


def _prompts(seed: int = 0, lengths=(3, 17, 33, 50)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


def hf_greedy(model, prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, min_new_tokens=max_new)
    return out[0, len(prompt):].tolist()


def run_engine(path: str, prompts, **engine_kwargs):
    llm = LLM(model=path, **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_hf_each_family(family, tiny_model_dir, hf_model):
    path = tiny_model_dir(family)
    prompts = _prompts()
    expected = [hf_greedy(hf_model(path), p) for p in prompts]
    _, got = run_engine(path, prompts)
    assert got == expected


@pytest.mark.parametrize("engine_kwargs", [
    dict(max_num_batched_tokens=8),  # prompts split into chunks, mixed with decodes
    dict(enable_chunked_prefill=False, max_num_batched_tokens=512),
    dict(block_size=4, max_num_seqs=2),
], ids=["chunked-8", "no-chunking", "block4-seqs2"])
def test_greedy_matches_hf_under_scheduling(engine_kwargs, tiny_model_dir, hf_model):
    path = tiny_model_dir("qwen3")
    prompts = _prompts(1)
    expected = [hf_greedy(hf_model(path), p) for p in prompts]
    _, got = run_engine(path, prompts, **engine_kwargs)
    assert got == expected


def test_greedy_matches_hf_under_preemption(tiny_model_dir, hf_model):
    path = tiny_model_dir("llama")
    prompts = _prompts(2, lengths=(9, 10, 11, 12, 13, 14))
    expected = [hf_greedy(hf_model(path), p) for p in prompts]
    # 12 blocks x 4 tokens: four prompts are admitted at once, then their decodes run out of blocks
    llm, got = run_engine(path, prompts, block_size=4, num_gpu_blocks_override=12)
    assert got == expected
    assert llm.engine.stats()["num_preemptions"] > 0


def test_greedy_matches_hf_with_prefix_cache_hits(tiny_model_dir, hf_model):
    path = tiny_model_dir("mistral")
    rng = random.Random(3)
    prefix = [rng.randrange(3, VOCAB) for _ in range(40)]
    prompts = [prefix + [rng.randrange(3, VOCAB) for _ in range(n)] for n in (1, 5, 9)]
    expected = [hf_greedy(hf_model(path), p) for p in prompts]
    llm = LLM(model=path, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first + rest] == expected
    assert all(o.num_cached_tokens == 40 for o in rest)  # 5 full blocks of the shared prefix
    assert llm.engine.stats()["prefix_cache_hits"] >= 80


def test_prompt_logprobs_match_hf(tiny_model_dir, hf_model):
    path = tiny_model_dir("qwen2")
    prompt = _prompts(4, lengths=(30,))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(path)(torch.tensor([prompt])).logits[0].float(), -1)
    llm = LLM(model=path, max_num_batched_tokens=7)  # prompt logprobs gathered across chunks
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, prompt_logprobs=3),
                       use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        token = prompt[pos]
        assert entry[token].logprob == pytest.approx(ref[pos - 1, token].item(), abs=1e-4)
        top = torch.topk(ref[pos - 1], 3)
        for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[tid].logprob == pytest.approx(lp, abs=1e-4)


def test_sample_logprobs_match_hf(tiny_model_dir, hf_model):
    path = tiny_model_dir("llama31")
    prompt = _prompts(5, lengths=(20,))[0]
    llm = LLM(model=path)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=4, logprobs=2,
                                                                       ignore_eos=True), use_tqdm=False)[0]
    completion = out.outputs[0]
    full = prompt + completion.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(path)(torch.tensor([full])).logits[0].float(), -1)
    total = 0.0
    for i, token in enumerate(completion.token_ids):
        row = ref[len(prompt) - 1 + i]
        lp = completion.logprobs[i][token]
        assert lp.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert lp.rank == 1  # greedy takes the top token
        assert len(completion.logprobs[i]) == 2  # chosen (also the top-1) + one alternative
        total += lp.logprob
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)
