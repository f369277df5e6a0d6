"""vLLM's extra request parameters on the HTTP API do what they say: allowed_token_ids, bad_words,
truncate_prompt_tokens, prompt_logprobs, return_tokens_as_token_ids (each case built from the model's own greedy
answer first); beam search is refused by name."""

from __future__ import annotations

import json

import pytest

from meshserve.engine.bad_words import tokenize_bad_words
from tests.serve.conftest import MODEL
from tests.serve.test_bad_inputs import assert_error_shape

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
USER = [{"role": "user", "content": "hi there"}]
PROMPT = [5, 17, 40, 99, 123, 7, 64, 201]
GREEDY = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
          "return_token_ids": True}


def _ids(http, body: dict) -> list[int]:
    resp = http.post(COMPL, json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["token_ids"]


# -- allowed_token_ids ------------------------------------------------------------------------------
def test_allowed_token_ids_are_the_only_ones_generated(http):
    greedy = _ids(http, GREEDY)
    a, b = [t for t in range(3, 300) if t not in greedy][:2]  # ids the model would not pick on its own
    assert set(_ids(http, {**GREEDY, "allowed_token_ids": [a, b]})) <= {a, b}
    sampled = _ids(http, {**GREEDY, "temperature": 1.0, "seed": 3, "max_tokens": 16, "allowed_token_ids": [a, b]})
    assert set(sampled) <= {a, b} and len(sampled) == 16
    # the mask reaches chat too: the answer is built from those two tokens only
    body = {"model": MODEL, "messages": USER, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "allowed_token_ids": [a], "logprobs": True, "return_tokens_as_token_ids": True}
    content = http.post(CHAT, json=body).json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{a}"] * 6


# -- bad_words --------------------------------------------------------------------------------------
def _first_completion(seqs: list[list[int]], ids: list[int]) -> int | None:
    """The first position at which one of seqs ends in ids, or None."""
    for k in range(len(ids)):
        if any(ids[max(0, k - len(s) + 1): k + 1] == s for s in seqs):
            return k
    return None


@pytest.mark.parametrize("length", [1, 2])
def test_bad_word_is_not_generated_where_greedy_would(http, live, length):
    tok = live.allm.tokenizer
    greedy = _ids(http, GREEDY)
    # a word of the greedy answer that tokenizes back into the same tokens
    for k in range(length, len(greedy)):
        word = tok.decode(greedy[k - length + 1: k + 1])
        if word.strip() and greedy[k - length + 1: k + 1] in tokenize_bad_words(tok, [word]):
            break
    else:
        pytest.skip("no word of the greedy answer round-trips through the tokenizer")
    banned = tokenize_bad_words(tok, [word])
    first = _first_completion(banned, greedy)
    out = _ids(http, {**GREEDY, "bad_words": [word]})
    assert out[:first] == greedy[:first] and out[first] != greedy[first]  # same answer up to the word
    assert _first_completion(banned, out) is None  # and the word nowhere
    assert word not in http.post(COMPL, json={**GREEDY, "bad_words": [word]}).json()["choices"][0]["text"]


# -- truncate_prompt_tokens -------------------------------------------------------------------------
def test_truncation_keeps_the_last_n_prompt_tokens(http):
    long_prompt = [(i * 37) % 300 + 3 for i in range(40)]
    body = {**GREEDY, "prompt": long_prompt, "truncate_prompt_tokens": 8, "echo": True}
    out = http.post(COMPL, json=body).json()
    assert out["usage"]["prompt_tokens"] == 8
    tail = http.post(COMPL, json={**GREEDY, "prompt": long_prompt[-8:], "echo": True}).json()
    assert out["choices"][0]["token_ids"] == tail["choices"][0]["token_ids"]  # the model read only the tail
    assert out["choices"][0]["text"] == tail["choices"][0]["text"]  # echo shows the prompt it read
    # shorter than N, or -1 (max_model_len): nothing cut
    assert http.post(COMPL, json={**body, "truncate_prompt_tokens": 100}).json()["usage"]["prompt_tokens"] == 40
    assert http.post(COMPL, json={**body, "truncate_prompt_tokens": -1}).json()["usage"]["prompt_tokens"] == 40
    # a prompt longer than the context is served once truncated
    too_long = [(i * 11) % 300 + 3 for i in range(600)]
    assert assert_error_shape(http.post(COMPL, json={**GREEDY, "prompt": too_long}), 400)["param"] == "prompt"
    resp = http.post(COMPL, json={**GREEDY, "prompt": too_long, "truncate_prompt_tokens": 100})
    assert resp.status_code == 200 and resp.json()["usage"]["prompt_tokens"] == 100
    chat = http.post(CHAT, json={"model": MODEL, "messages": USER, "max_tokens": 2, "truncate_prompt_tokens": 3})
    assert chat.json()["usage"]["prompt_tokens"] == 3


# -- prompt_logprobs --------------------------------------------------------------------------------
def _echo_logprobs(http, prompt: list[int], k: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": k}
    return http.post(COMPL, json=body).json()["choices"][0]["logprobs"]


def _assert_matches_echo(scored: list, prompt: list[int], echo: dict, k: int) -> None:
    assert len(scored) == len(prompt) and scored[0] is None and echo["token_logprobs"][0] is None
    for i in range(1, len(prompt)):
        pos = scored[i]
        assert pos[str(prompt[i])]["logprob"] == pytest.approx(echo["token_logprobs"][i], abs=1e-4)
        assert len(pos) <= k + 1 and all(lp["rank"] >= 1 for lp in pos.values())
        by_text = {lp["decoded_token"]: lp["logprob"] for lp in pos.values()}
        if len(by_text) == len(pos):  # distinct texts: the echo's top dict is the same set
            assert by_text == pytest.approx(echo["top_logprobs"][i], abs=1e-4)


def test_prompt_logprobs_equal_the_echo_paths(http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "prompt_logprobs": 2}
    choice = http.post(COMPL, json=body).json()["choices"][0]
    assert choice["logprobs"] is None
    _assert_matches_echo(choice["prompt_logprobs"], PROMPT, _echo_logprobs(http, PROMPT, 2), 2)
    # with echo asking for more alternatives, each gets its own k from one scoring pass
    both = http.post(COMPL, json={**body, "prompt_logprobs": 1, "echo": True, "logprobs": 3}).json()["choices"][0]
    _assert_matches_echo(both["prompt_logprobs"], PROMPT, _echo_logprobs(http, PROMPT, 1), 1)
    prompt_part = slice(1, len(PROMPT))
    assert both["logprobs"]["top_logprobs"][prompt_part] == _echo_logprobs(http, PROMPT, 3)["top_logprobs"][prompt_part]
    # every choice of the prompt carries them, as vLLM sends them
    n2 = http.post(COMPL, json={**body, "n": 2, "temperature": 1.0, "seed": 1}).json()["choices"]
    assert n2[0]["prompt_logprobs"] == n2[1]["prompt_logprobs"]
    _assert_matches_echo(n2[0]["prompt_logprobs"], PROMPT, _echo_logprobs(http, PROMPT, 2), 2)
    # without the parameter: null, as vLLM's whole choice carries it
    assert http.post(COMPL, json={**body, "prompt_logprobs": None}).json()["choices"][0]["prompt_logprobs"] is None


def test_chat_prompt_logprobs_beside_the_choices(http):
    rendered = http.post("/tokenize", json={"model": MODEL, "messages": USER}).json()["tokens"]
    out = http.post(CHAT, json={"model": MODEL, "messages": USER, "max_tokens": 2, "prompt_logprobs": 2}).json()
    assert out["usage"]["prompt_tokens"] == len(rendered)
    _assert_matches_echo(out["prompt_logprobs"], rendered, _echo_logprobs(http, rendered, 2), 2)
    plain = http.post(CHAT, json={"model": MODEL, "messages": USER, "max_tokens": 2}).json()
    assert plain["prompt_logprobs"] is None


# -- return_tokens_as_token_ids ---------------------------------------------------------------------
def test_tokens_as_token_ids(http):
    body = {**GREEDY, "logprobs": 2, "max_tokens": 5}
    text = http.post(COMPL, json=body).json()["choices"][0]
    as_ids = http.post(COMPL, json={**body, "return_tokens_as_token_ids": True}).json()["choices"][0]
    assert as_ids["logprobs"]["tokens"] == [f"token_id:{t}" for t in as_ids["token_ids"]]
    assert as_ids["logprobs"]["token_logprobs"] == text["logprobs"]["token_logprobs"]
    assert all(key.startswith("token_id:") for top in as_ids["logprobs"]["top_logprobs"] for key in top)
    # echoed prompt tokens too
    echoed = http.post(COMPL, json={**body, "echo": True, "return_tokens_as_token_ids": True}).json()["choices"][0]
    assert echoed["logprobs"]["tokens"][:len(PROMPT)] == [f"token_id:{t}" for t in PROMPT]
    chat = {"model": MODEL, "messages": USER, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2}
    plain = http.post(CHAT, json=chat).json()["choices"][0]["logprobs"]["content"]
    ids = http.post(CHAT, json={**chat, "return_tokens_as_token_ids": True}).json()["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in ids] == [c["logprob"] for c in plain]
    assert all(c["token"].startswith("token_id:") and c["bytes"] == list(c["token"].encode()) for c in ids)
    # the ids are the tokens whose texts the plain answer shows
    tok_texts = http.post("/detokenize", json={"model": MODEL, "tokens": [int(c["token"][9:]) for c in ids]}).json()
    assert tok_texts["prompt"] == "".join(c["token"] for c in plain)


# -- refusals ---------------------------------------------------------------------------------------
REFUSED = [
    ("use_beam_search", COMPL, {"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    ("use_beam_search chat", CHAT, {"messages": USER, "use_beam_search": True}, "use_beam_search"),
    ("length_penalty", CHAT, {"messages": USER, "length_penalty": 0.5}, "length_penalty"),
    ("allowed_token_ids empty", COMPL, {"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
    ("allowed_token_ids negative", COMPL, {"prompt": "x", "allowed_token_ids": [1, -2]}, "allowed_token_ids"),
    ("allowed_token_ids out of vocab", CHAT, {"messages": USER, "allowed_token_ids": [1, 10**6]},
     "allowed_token_ids"),
    ("bad_words blank", COMPL, {"prompt": "x", "bad_words": ["ok", " "]}, "bad_words"),
    ("truncate_prompt_tokens 0", COMPL, {"prompt": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("truncate_prompt_tokens -5", COMPL, {"prompt": "x", "truncate_prompt_tokens": -5}, "truncate_prompt_tokens"),
    ("truncate_prompt_tokens past max_model_len", CHAT, {"messages": USER, "truncate_prompt_tokens": 513},
     "truncate_prompt_tokens"),
    ("prompt_logprobs -1", COMPL, {"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
    ("prompt_logprobs streamed", COMPL, {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("prompt_logprobs streamed chat", CHAT, {"messages": USER, "prompt_logprobs": 0, "stream": True},
     "prompt_logprobs"),
]


@pytest.mark.parametrize("name,path,body,param", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_400_naming_the_parameter(http, name, path, body, param):
    err = assert_error_shape(http.post(path, json={"model": MODEL, **body}), 400)
    assert err["param"] == param and param in err["message"], err


def test_harmless_values_are_accepted(http):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "use_beam_search": False, "length_penalty": 1.0,
            "bad_words": []}
    assert http.post(COMPL, json=body).status_code == 200


# -- echo (chat) ------------------------------------------------------------------------------------
def test_chat_echo_returns_the_continued_message_whole(http):
    """vLLM's chat echo: a continued assistant turn comes back with its prefill first (echo was ignored)."""
    prefill = "Sure, the answer is"
    body = {"model": MODEL, "messages": USER + [{"role": "assistant", "content": prefill}], "max_tokens": 5,
            "temperature": 0, "ignore_eos": True, "continue_final_message": True, "add_generation_prompt": False}
    plain = http.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
    echoed = http.post(CHAT, json={**body, "echo": True}).json()["choices"][0]["message"]["content"]
    assert echoed == prefill + plain
    with http.stream("POST", CHAT, json={**body, "echo": True, "stream": True}) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == echoed
    # a new turn has another role than the last message: nothing to echo, as in vLLM
    new_turn = {"model": MODEL, "messages": USER, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    assert http.post(CHAT, json={**new_turn, "echo": True}).json()["choices"][0]["message"]["content"] == \
        http.post(CHAT, json=new_turn).json()["choices"][0]["message"]["content"]
