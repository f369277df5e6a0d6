"""X-Request-Id as vLLM 0.26 treats it: a request's header names it (the response id is <prefix>-<header>, over the
body's request_id) with or without --enable-request-id-headers (serving.py's _base_request_id); with the flag every
response carries an X-Request-Id header, the request's own or a fresh uuid4 hex (server_utils.XRequestIdMiddleware),
refusals from the gate included. An id may name several requests in flight at once (vLLM's assign_request_id: the
engine's own id gets a random suffix, the response keeps the client's)."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from meshserve.serve.config import ServeConfig
from tests.serve.conftest import MODEL, start_server, wait_idle

COMPLETION = {"model": MODEL, "prompt": [5, 17, 40], "max_tokens": 2, "temperature": 0, "ignore_eos": True}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def with_headers(tiny_engine):
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL], enable_request_id_headers=True,
                                                api_key="k"))
    with httpx.Client(base_url=srv.base_url, timeout=60, headers={"Authorization": "Bearer k"}) as client:
        yield client
    srv.stop()


def _stream_ids(client, path: str, body: dict, headers: dict) -> tuple[httpx.Headers, set[str]]:
    with client.stream("POST", path, json={**body, "stream": True}, headers=headers) as resp:
        assert resp.status_code == 200
        ids = {json.loads(line[6:])["id"] for line in resp.iter_lines()
               if line.startswith("data: ") and line != "data: [DONE]"}
        return resp.headers, ids


def test_the_header_names_the_request_over_the_body_without_the_flag(http):
    sent = {"X-Request-Id": "trace-7"}
    resp = http.post("/v1/completions", json={**COMPLETION, "request_id": "body-1"}, headers=sent)
    assert resp.json()["id"] == "cmpl-trace-7"
    assert "x-request-id" not in resp.headers  # no header back without the flag
    assert http.post("/v1/chat/completions", json=CHAT, headers=sent).json()["id"] == "chatcmpl-trace-7"
    assert http.post("/v1/completions", json={**COMPLETION, "request_id": "body-1"}).json()["id"] == "cmpl-body-1"
    _, ids = _stream_ids(http, "/v1/chat/completions", CHAT, {"X-Request-Id": "trace-8"})
    assert ids == {"chatcmpl-trace-8"}
    # SageMaker's /invocations goes to the same handlers
    assert http.post("/invocations", json=COMPLETION, headers={"X-Request-Id": "sm-1"}).json()["id"] == "cmpl-sm-1"


@pytest.mark.parametrize("path,prefix,named_by", [("/v1/chat/completions", "chatcmpl", "header"),
                                                   ("/v1/completions", "cmpl", "body")])
def test_requests_in_flight_may_share_an_id(live, path, prefix, named_by):
    # vLLM accepts them (the engine's id is <id>-<random>); meshserve refused the second as "already in use"
    allm = live.allm
    wait_idle(allm)
    rid = f"dup-{named_by}-{prefix}"
    headers, extra = ({"X-Request-Id": rid}, {}) if named_by == "header" else ({}, {"request_id": rid})
    base = {**(CHAT if prefix == "chatcmpl" else COMPLETION), **extra, "ignore_eos": True}
    # long enough that the first stays in flight while the second runs (as in test_lifecycle's disconnect test)
    long = {**base, "max_tokens": 480, "n": 16, "stream": True}
    with httpx.Client(base_url=live.base_url, timeout=60) as http:
        with http.stream("POST", path, json=long, headers=headers) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            line = next(x for x in lines if x.startswith("data: "))
            assert json.loads(line[6:])["id"] == f"{prefix}-{rid}"
            assert allm.engine.requests  # the first is still generating
            second = http.post(path, json={**base, "max_tokens": 3}, headers=headers)
            assert second.status_code == 200, second.text
            assert second.json()["id"] == f"{prefix}-{rid}" and second.json()["usage"]["completion_tokens"] == 3
            _, ids = _stream_ids(http, path, {**base, "max_tokens": 3}, headers)  # and a third, streamed
            assert ids == {f"{prefix}-{rid}"}
            # the others' ends aborted nothing of the first: each of its choices runs to its length
            finishes = [ch["finish_reason"] for x in lines if x.startswith("data: {")
                        for ch in json.loads(x[6:])["choices"] if ch["finish_reason"]]
            assert finishes == ["length"] * 16
        stats = wait_idle(allm)
        assert not allm.engine.requests and stats["kv_cache_usage"] == 0.0
        # a disconnect still aborts its own request (by its engine id): everything is freed
        with http.stream("POST", path, json=long, headers=headers) as first:
            next(x for x in first.iter_lines() if x.startswith("data: "))
            assert http.post(path, json={**base, "max_tokens": 3}, headers=headers).status_code == 200
        stats = wait_idle(allm)
        assert not allm.engine.requests and stats["kv_cache_usage"] == 0.0


def test_with_the_flag_each_response_carries_the_request_s_header(with_headers):
    resp = with_headers.post("/v1/completions", json={**COMPLETION, "request_id": "body-2"},
                             headers={"X-Request-Id": "trace-9"})
    assert resp.status_code == 200
    assert resp.headers.get_list("x-request-id") == ["trace-9"] and resp.json()["id"] == "cmpl-trace-9"
    headers, ids = _stream_ids(with_headers, "/v1/completions", COMPLETION, {"X-Request-Id": "trace-10"})
    assert headers["x-request-id"] == "trace-10" and ids == {"cmpl-trace-10"}
    # not sent: a fresh uuid4 hex per response, not the body's id
    resp = with_headers.post("/v1/completions", json={**COMPLETION, "request_id": "body-3"})
    assert resp.json()["id"] == "cmpl-body-3" and HEX32.match(resp.headers["x-request-id"])
    again = with_headers.get("/health").headers["x-request-id"]
    assert HEX32.match(again) and again != resp.headers["x-request-id"]


def test_with_the_flag_refusals_and_probes_carry_it_too(with_headers):
    unauthorized = with_headers.post("/v1/completions", json=COMPLETION,
                                     headers={"Authorization": "Bearer wrong", "X-Request-Id": "r-401"})
    assert unauthorized.status_code == 401 and unauthorized.headers["x-request-id"] == "r-401"
    invalid = with_headers.post("/v1/completions", json={**COMPLETION, "max_tokens": -1},
                                headers={"X-Request-Id": "r-400"})
    assert invalid.status_code == 400 and invalid.headers["x-request-id"] == "r-400"
    assert with_headers.get("/v1/models", headers={"X-Request-Id": "m"}).headers["x-request-id"] == "m"


def test_the_flag_parses_and_reaches_the_config():
    from meshserve.cli import build_parser
    from meshserve.router.launcher import argv_from_namespace
    from meshserve.serve.cli import serve_config_from
    from meshserve.serve.vllm_compat_args import apply_vllm_compat

    def config(*flags):
        parser = build_parser(["serve"])
        ns = parser.parse_args(["serve", MODEL, *flags])
        apply_vllm_compat(ns)
        return ns, serve_config_from(ns, MODEL)

    ns, on = config("--enable-request-id-headers")
    assert on.enable_request_id_headers
    assert "--enable-request-id-headers" in argv_from_namespace(ns.serve_parser, ns)  # the router's replicas
    assert not config()[1].enable_request_id_headers
    assert not config("--enable-request-id-headers", "--no-enable-request-id-headers")[1].enable_request_id_headers
