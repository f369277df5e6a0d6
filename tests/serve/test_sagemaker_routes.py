"""SageMaker's routes, as vLLM's server has them: /ping (GET and POST) answers as /health, and /invocations serves a
body as the first request type it validates as (chat, then completions), whole or streamed, behind the same API
key and drain gate as /v1."""

from __future__ import annotations

import json

import httpx
import pytest

from meshserve.serve.config import ServeConfig
from tests.serve.conftest import MODEL, start_server
from tests.serve.test_bad_inputs import assert_error_shape

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}
COMPLETION = {"model": MODEL, "prompt": "The capital of France", "max_tokens": 4, "temperature": 0,
              "ignore_eos": True}
NO_HANDLER = ("Cannot find suitable handler for request. Expected one of: "
              "['ChatCompletionRequest', 'CompletionRequest']")


def _events(http: httpx.Client, path: str, body: dict) -> list[str]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def _stream_text(events: list[str], chat: bool) -> str:
    chunks = [json.loads(e) for e in events[:-1]]
    key = (lambda c: c["delta"].get("content") or "") if chat else (lambda c: c["text"])
    return "".join(key(c) for chunk in chunks for c in chunk["choices"])


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_ping_answers_as_health(http, method):
    health = http.get("/health")
    r = http.request(method, "/ping")
    assert r.status_code == health.status_code == 200 and r.json() == health.json()


def test_invocations_serves_chat_and_completions_as_their_routes(http):
    for body, path, obj in ((CHAT, "/v1/chat/completions", "chat.completion"),
                            (COMPLETION, "/v1/completions", "text_completion")):
        via = http.post("/invocations", json=body)
        direct = http.post(path, json=body)
        assert via.status_code == direct.status_code == 200, via.text
        a, b = via.json(), direct.json()
        assert a["object"] == b["object"] == obj
        assert a["choices"] == b["choices"] and a["usage"] == b["usage"]
        assert set(a) == set(b)


def test_invocations_streams_as_the_original_routes(http):
    for body, path, chat in ((CHAT, "/v1/chat/completions", True), (COMPLETION, "/v1/completions", False)):
        via, direct = _events(http, "/invocations", body), _events(http, path, body)
        assert via[-1] == direct[-1] == "[DONE]"
        assert _stream_text(via, chat) == _stream_text(direct, chat) != ""
        assert json.loads(via[0])["object"] == json.loads(direct[0])["object"]


def test_a_body_valid_as_both_is_chat_as_in_vllm(http):
    r = http.post("/invocations", json={**CHAT, "prompt": "ignored"})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"


@pytest.mark.parametrize("body", [{"model": MODEL}, {"model": MODEL, "messages": []}, [CHAT],
                                  {**CHAT, "temperature": "hot"}, {"model": MODEL, "prompt": 3}])
def test_a_body_of_no_request_type_is_vllms_400(http, body):
    err = assert_error_shape(http.post("/invocations", json=body), 400)
    assert err["message"] == NO_HANDLER


def test_a_body_that_is_no_json_is_a_400(http):
    r = http.post("/invocations", content=b"{not json", headers={"content-type": "application/json"})
    assert assert_error_shape(r, 400)["code"] == "invalid_json"


@pytest.mark.parametrize("content_type", ["text/plain", None])
def test_a_body_not_sent_as_json_is_vllms_400(http, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r = http.post("/invocations", content=json.dumps(CHAT).encode(), headers=headers)
    assert "Only 'application/json' is allowed" in assert_error_shape(r, 400)["message"]
    ok = http.post("/invocations", content=json.dumps(CHAT).encode(),
                   headers={"content-type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_engine_errors_keep_their_status_through_invocations(http):
    r = http.post("/invocations", json={**CHAT, "model": "no-such-model"})
    direct = http.post("/v1/chat/completions", json={**CHAT, "model": "no-such-model"})
    assert assert_error_shape(r, 404) == assert_error_shape(direct, 404)


def test_api_key_and_drain_gate_invocations_not_ping(tiny_engine):
    """vLLM's guard: every route but the probes (/health, /ping, ...) needs the key when --api-key is set."""
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL], api_key="s3cret"))
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            assert_error_shape(http.post("/invocations", json=CHAT), 401)
            assert_error_shape(http.post("/invocations", json={"bad": 1}), 401)  # before the body is looked at
            auth = {"Authorization": "Bearer s3cret"}
            assert http.post("/invocations", json=CHAT, headers=auth).status_code == 200
            assert http.get("/ping").status_code == 200 and http.post("/ping").status_code == 200
            srv.state.draining = True
            try:
                assert_error_shape(http.post("/invocations", json=CHAT, headers=auth), 503)
                assert http.get("/ping").status_code == 200  # the probes still answer while draining
            finally:
                srv.state.draining = False
    finally:
        srv.stop()


def test_openapi_lists_the_routes(http):
    paths = http.get("/openapi.json").json()["paths"]
    assert set(paths["/ping"]) == {"get", "post"}
    schema = paths["/invocations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert [s["$ref"].rsplit("/", 1)[1] for s in schema["anyOf"]] == ["ChatCompletionRequest", "CompletionRequest"]
    components = http.get("/openapi.json").json()["components"]["schemas"]
    assert {"ChatCompletionRequest", "CompletionRequest"} <= set(components)
