"""Bad input gets its status and OpenAI's error shape, and the server keeps answering afterwards."""

from __future__ import annotations

import json

import pytest

from tests.serve.conftest import MODEL

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]

# (name, path, json body or raw bytes, expected status, expected param or None)
CASES = [
    ("prompt wrong type", COMPL, {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("max_tokens wrong type", COMPL, {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("n wrong type", CHAT, {"model": MODEL, "messages": USER, "n": "two"}, 400, "n"),
    ("messages wrong type", CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("body is a list", COMPL, [1, 2, 3], 400, None),
    ("negative max_tokens", COMPL, {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("zero max_tokens", CHAT, {"model": MODEL, "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ("huge max_tokens", COMPL, {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("enormous max_tokens", CHAT, {"model": MODEL, "messages": USER, "max_completion_tokens": 10**30}, 400,
     "max_tokens"),
    # vLLM's answer too: a priority the first-come-first-served queue would ignore without a word
    ("stream_options without stream", CHAT, {"model": MODEL, "messages": USER,
                                             "stream_options": {"include_usage": True}}, 400, None),
    ("priority under fcfs", COMPL, {"model": MODEL, "prompt": "x", "priority": 1}, 400, "priority"),
    ("temperature < 0", COMPL, {"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("top_p > 1", CHAT, {"model": MODEL, "messages": USER, "top_p": 1.5}, 400, "top_p"),
    ("n too large", COMPL, {"model": MODEL, "prompt": "x", "n": 100000}, 400, "n"),
    ("logprobs > 20", COMPL, {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("top_logprobs without logprobs", CHAT, {"model": MODEL, "messages": USER, "top_logprobs": 2}, 400, None),
    ("seed past 64 bits", COMPL, {"model": MODEL, "prompt": "x", "seed": 2**64}, 400, "seed"),
    ("stop token out of vocab", COMPL, {"model": MODEL, "prompt": "x", "stop_token_ids": [10**6],
                                        "min_tokens": 2}, 400, "stop_token_ids"),
    ("empty stop string", COMPL, {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop"),
    ("empty messages", CHAT, {"model": MODEL, "messages": []}, 400, "messages"),
    ("unknown role", CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages.0.role"),
    ("missing messages", CHAT, {"model": MODEL}, 400, "messages"),
    ("empty prompt list", COMPL, {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("empty token list", COMPL, {"model": MODEL, "prompt": [[]]}, 400, "prompt"),
    ("token id out of vocab", COMPL, {"model": MODEL, "prompt": [1, 2, 10**6]}, 400, "prompt"),
    ("negative token id", COMPL, {"model": MODEL, "prompt": [1, -2]}, 400, "prompt"),
    ("prompt over the context", COMPL, {"model": MODEL, "prompt": [5] * 600}, 400, "prompt"),
    ("prompt + max_tokens over the context", COMPL, {"model": MODEL, "prompt": [5] * 500, "max_tokens": 50},
     400, "max_tokens"),
    ("unknown model", COMPL, {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("unknown model (chat)", CHAT, {"model": "gpt-9", "messages": USER}, 404, "model"),
    ("malformed JSON", COMPL, b'{"model": "tiny", "prompt": ', 400, None),
    ("NaN temperature", COMPL, b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, None),
    ("not JSON at all", CHAT, b"\xff\xfe garbage", 400, None),
    ("oversize body", COMPL, {"model": MODEL, "prompt": "x" * (300 * 1024)}, 413, None),
    # a lone UTF-16 surrogate escape is valid JSON but not text: these were 500s (or a reset connection, when the
    # 404 echoed the model name), from the tokenizer, the stop strings and the error response itself
    ("lone surrogate in stop", COMPL, b'{"model": "tiny", "prompt": "x", "stop": ["\\ud800"]}', 400, None),
    ("lone surrogate in bad_words", COMPL, b'{"model": "tiny", "prompt": "x", "bad_words": ["a\\udc00"]}', 400, None),
    ("lone surrogate in model", COMPL, b'{"model": "\\ud800", "prompt": "x"}', 400, None),
    ("lone surrogate in logit_bias", COMPL, b'{"model": "tiny", "prompt": "x", "logit_bias": {"\\uDBFF": 1}}', 400,
     None),
    ("lone surrogate in a message", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
     400, None),
    ("lone surrogate to /tokenize", "/tokenize", b'{"prompt": "\\ud83d"}', 400, None),
]


def _post(http, path, body):
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"content-type": "application/json"})
    return http.post(path, json=body)


def assert_error_shape(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in resp.text
    return err


@pytest.mark.parametrize("name,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input(http, name, path, body, status, param):
    err = assert_error_shape(_post(http, path, body), status)
    if param is not None:
        assert err["param"] == param, err


def test_server_still_serves_after_bad_inputs(http):
    for _, path, body, _, _ in CASES:
        _post(http, path, body)
    assert http.get("/health").status_code == 200
    resp = http.post(COMPL, json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3


def test_bad_input_while_streaming_requested(http):
    # errors found before the stream starts still get a status code, not an event
    resp = http.post(COMPL, json={"model": MODEL, "prompt": [5] * 600, "stream": True})
    assert_error_shape(resp, 400)


def test_unknown_route_and_method(http):
    assert_error_shape(http.get("/v1/nothing"), 404)
    assert_error_shape(http.get(COMPL), 405)


def test_chunked_oversize_body_is_413(http):
    def chunks():
        for _ in range(40):
            yield b" " * 8192  # no content-length: the limit is enforced while reading
    resp = http.post(COMPL, content=chunks(), headers={"content-type": "application/json"})
    assert_error_shape(resp, 413)


def test_openapi_document(http):
    doc = http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics",
            "/version"} <= set(doc["paths"])
    assert json.dumps(doc)  # serializable


def test_internal_error_is_a_500_without_details(tiny_engine):
    import httpx

    from meshserve.serve.config import ServeConfig
    from tests.serve.conftest import start_server

    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL]))
    try:
        async def broken(*args, **kwargs):
            raise RuntimeError("secret internal detail /etc/passwd")

        srv.app.state.engine_client.start = broken
        with httpx.Client(base_url=srv.base_url, timeout=30) as http:
            for path, body in ((COMPL, {"model": MODEL, "prompt": "x"}),
                               (CHAT, {"model": MODEL, "messages": USER, "stream": True})):
                resp = http.post(path, json=body)
                err = assert_error_shape(resp, 500)
                assert "secret" not in resp.text and err["type"] == "internal_error"
            assert http.get("/health").status_code == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("body, message", [
    ([1, 2, 3], "the request body must be a JSON object"),
    ({"model": MODEL, "prompt": []}, "prompt: prompt must not be empty"),
    ({"model": MODEL, "prompt": ""}, "prompt: prompt must not be empty"),
    ({"model": MODEL, "prompt": ["a", ""]}, "prompt: prompt must not be empty"),
])
def test_bad_shapes_get_one_sentence(http, body, message):
    err = assert_error_shape(_post(http, COMPL, body), 400)
    assert err["message"].startswith(message) and "more error" not in err["message"], err


def test_escaped_surrogate_pairs_and_backslashes_are_text(http):
    """An emoji as an escaped surrogate pair, and an escaped backslash before "ud800", are fine."""
    for body in (b'{"model": "tiny", "prompt": "hi \\ud83d\\ude00", "max_tokens": 2}',
                 b'{"model": "tiny", "prompt": "path \\\\ud800", "max_tokens": 2}'):
        assert _post(http, COMPL, body).status_code == 200
