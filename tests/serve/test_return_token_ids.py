"""vLLM's return_token_ids on /v1/completions: each choice (each streamed chunk) carries its generated ids, the
streamed ids add up to the whole answer's, each choice carries its prompt's ids (streamed: in its first chunk only,
vllm/entrypoints/openai/completion/serving.py), and without the flag the shape stays OpenAI's."""

from __future__ import annotations

import json

from tests.serve.conftest import MODEL


def _stream(http, body: dict) -> list[dict]:
    chunks = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    return chunks


def test_streamed_ids_add_up_to_the_whole_answers(http):
    body = {"model": MODEL, "prompt": [5, 17, 40, 99, 123], "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    whole = http.post("/v1/completions", json=body).json()
    ids = whole["choices"][0]["token_ids"]
    assert len(ids) == whole["usage"]["completion_tokens"] == 12
    chunks = _stream(http, body)
    streamed = [i for c in chunks for ch in c["choices"] for i in ch["token_ids"]]
    assert streamed == ids
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    # greedy: the ids are the model's own continuation, so re-sending them extends the same sequence
    longer = http.post("/v1/completions", json={**body, "max_tokens": 4, "prompt": body["prompt"] + ids[:6]}).json()
    assert longer["choices"][0]["token_ids"] == ids[6:10]


def test_without_the_flag_no_ids_are_sent(http):
    body = {"model": MODEL, "prompt": [5, 17, 40], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    assert "token_ids" not in choice and "prompt_token_ids" not in choice
    assert all("token_ids" not in ch and "prompt_token_ids" not in ch for c in _stream(http, body)
               for ch in c["choices"])


def test_each_choice_carries_its_prompt_s_ids(http):
    prompts = [[5, 17, 40], [7, 8, 9, 10]]
    body = {"model": MODEL, "prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    whole = http.post("/v1/completions", json=body).json()
    assert [c["prompt_token_ids"] for c in whole["choices"]] == [prompts[0]] * 2 + [prompts[1]] * 2
    text = http.post("/v1/completions", json={**body, "prompt": "hello world", "n": 1}).json()["choices"][0]
    assert text["prompt_token_ids"] == http.post("/tokenize", json={"model": MODEL, "prompt": "hello world"}
                                                 ).json()["tokens"]
    # streamed: in each choice's first chunk, and in no later one
    seen: dict[int, list] = {}
    for chunk in _stream(http, body):
        for ch in chunk["choices"]:
            assert ("prompt_token_ids" in ch) == (ch["index"] not in seen)
            seen.setdefault(ch["index"], []).append(ch.get("prompt_token_ids"))
    assert {i: ids[0] for i, ids in seen.items()} == {0: prompts[0], 1: prompts[0], 2: prompts[1], 3: prompts[1]}


def test_with_echo_the_prompt_s_ids_stand_for_its_text(http):
    # vLLM: echo with return_token_ids leaves the prompt's text out (prompt_text = ""); its logprobs stay
    body = {"model": MODEL, "prompt": [5, 17, 40], "max_tokens": 2, "temperature": 0, "ignore_eos": True,
            "echo": True, "return_token_ids": True, "logprobs": 1}
    plain = http.post("/v1/completions", json={**body, "echo": False, "logprobs": None}).json()["choices"][0]
    echoed = http.post("/v1/completions", json=body).json()["choices"][0]
    assert echoed["text"] == plain["text"] and echoed["token_ids"] == plain["token_ids"]
    assert echoed["prompt_token_ids"] == [5, 17, 40] and len(echoed["logprobs"]["tokens"]) == 5
    streamed = [ch for c in _stream(http, body) for ch in c["choices"]]
    assert "".join(ch["text"] for ch in streamed) == plain["text"]
    assert streamed[0]["prompt_token_ids"] == [5, 17, 40]
    only = http.post("/v1/completions", json={**body, "max_tokens": 0}).json()["choices"][0]
    assert only["text"] == "" and only["prompt_token_ids"] == [5, 17, 40] and len(only["token_ids"]) == 1
