"""vLLM's return_token_ids on /v1/completions: each choice (each streamed chunk) carries its generated ids, the
streamed ids add up to the whole answer's, and without the flag the shape stays OpenAI's."""

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
    assert "token_ids" not in http.post("/v1/completions", json=body).json()["choices"][0]
    assert all("token_ids" not in ch for c in _stream(http, body) for ch in c["choices"])
