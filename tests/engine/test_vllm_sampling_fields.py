"""Offline LLM.generate with vLLM's SamplingParams fields allowed_token_ids, bad_words, truncate_prompt_tokens and
prompt_logprobs: each does what it says (cases built from the greedy answer), bad values are refused by name."""

from __future__ import annotations

import pytest

from meshserve import LLM, SamplingParams
from meshserve.engine.bad_words import tokenize_bad_words
from meshserve.errors import InvalidArgumentError

PROMPT = {"prompt_token_ids": [5, 17, 40, 99, 123, 7, 64, 201, 33, 12]}


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=tiny_model_dir("llama"), block_size=4, max_model_len=64)


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, **kw)


def _ids(llm, prompt, params) -> list[int]:
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


def test_allowed_token_ids(llm):
    greedy = _ids(llm, PROMPT, _greedy())
    a, b = [t for t in range(3, 300) if t not in greedy][:2]
    assert set(_ids(llm, PROMPT, _greedy(allowed_token_ids=[a, b]))) <= {a, b}
    mixed = llm.generate([PROMPT, PROMPT], [_greedy(allowed_token_ids=[a]), _greedy()], use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == [a] * 10 and mixed[1].outputs[0].token_ids == greedy  # per row


def test_bad_words_change_the_answer_only_from_the_word_on(llm):
    tok = llm.engine.tokenizer
    greedy = _ids(llm, PROMPT, _greedy())
    # a one-token word of the greedy answer (every spelling the ban covers is one token too)
    for token in greedy:
        word = tok.decode([token])
        banned = tokenize_bad_words(tok, [word])
        if word.strip() and [token] in banned and all(len(s) == 1 for s in banned):
            break
    else:
        pytest.skip("no greedy token is a word of its own")
    banned_ids = {s[0] for s in banned}
    first = min(i for i, t in enumerate(greedy) if t in banned_ids)
    out = _ids(llm, PROMPT, _greedy(bad_words=[word]))
    assert out[:first] == greedy[:first] and not banned_ids & set(out)


def test_truncate_prompt_tokens_and_prompt_logprobs(llm):
    long_prompt = [(i * 37) % 300 + 3 for i in range(80)]  # longer than max_model_len
    with pytest.raises(InvalidArgumentError):
        llm.generate([long_prompt], _greedy(), use_tqdm=False)
    out = llm.generate([long_prompt], _greedy(truncate_prompt_tokens=20, prompt_logprobs=1), use_tqdm=False)[0]
    assert out.prompt_token_ids == long_prompt[-20:]
    assert out.outputs[0].token_ids == _ids(llm, long_prompt[-20:], _greedy())
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 20
    assert all(out.prompt_token_ids[i] in out.prompt_logprobs[i] for i in range(1, 20))


@pytest.mark.parametrize("kw,param", [
    (dict(allowed_token_ids=[1, 10**6]), "allowed_token_ids"),
    (dict(truncate_prompt_tokens=65), "truncate_prompt_tokens"),
])
def test_out_of_range_values_are_refused(llm, kw, param):
    with pytest.raises(InvalidArgumentError) as e:
        llm.generate([PROMPT], _greedy(**kw), use_tqdm=False)
    assert e.value.param == param
