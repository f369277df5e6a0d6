"""Requests that leave sampling fields unset take the model's generation_config.json defaults (as vLLM)."""

from __future__ import annotations


import httpx
import pytest

from meshserve.serve.config import ServeConfig
from tests.serve.conftest import MODEL, make_engine, start_server

PROMPT = "The capital of France is"


def _server(model: str, **engine_args):
    allm = make_engine(model, **engine_args)
    srv = start_server(allm, ServeConfig(served_model_names=[MODEL]))
    http = httpx.Client(base_url=srv.v1, timeout=60)
    return allm, srv, http


@pytest.fixture(scope="module")
def http(greedy_model):
    allm, srv, client = _server(greedy_model)
    yield client
    client.close()
    srv.stop()
    allm.shutdown()


def _complete(http: httpx.Client, **fields) -> dict:
    body = {"model": MODEL, "prompt": PROMPT, "n": 3, "ignore_eos": True, **fields}
    resp = http.post("/completions", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _texts(body: dict) -> list[str]:
    return [c.get("text", c.get("message", {}).get("content")) for c in body["choices"]]


def test_unset_fields_take_the_models_defaults(http):
    body = _complete(http)
    assert len(set(_texts(body))) == 1  # temperature 0 from the file: three identical greedy choices
    assert body["usage"]["completion_tokens"] == 3 * 5  # max_new_tokens 5, not OpenAI's 16
    assert _texts(body) == _texts(_complete(http, temperature=0, max_tokens=5))


def test_request_fields_override_them(http):
    body = _complete(http, temperature=1.0, seed=0, max_tokens=8)
    assert len(set(_texts(body))) > 1  # sampled
    assert body["usage"]["completion_tokens"] == 3 * 8


def test_chat_without_max_tokens_takes_max_new_tokens(http):
    resp = http.post("/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["usage"]["completion_tokens"] == 2 * 5 and len(set(_texts(body))) == 1


def test_generation_config_vllm_ignores_the_file(greedy_model):
    allm, srv, http = _server(greedy_model, generation_config="vllm")
    try:
        body = _complete(http, seed=0)
        assert len(set(_texts(body))) > 1  # temperature 1.0
        assert body["usage"]["completion_tokens"] == 3 * 16  # OpenAI's max_tokens
    finally:
        http.close()
        srv.stop()
        allm.shutdown()
