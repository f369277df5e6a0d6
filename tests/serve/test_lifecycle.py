"""Disconnects, API keys, metrics, the queue bound and draining, on live servers."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshserve.serve.config import ServeConfig
from meshserve.serve.middleware import ServerState
from tests.serve.conftest import MODEL, start_server, wait_idle


def _stream_lines(resp: httpx.Response):
    for line in resp.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


def test_mid_stream_disconnect_frees_blocks(live):
    allm = live.allm
    wait_idle(allm)
    tokens_before = allm.engine.num_generated_tokens
    # long enough that a client starved on a loaded machine (its server thread shares the test's GIL) still
    # reads its first event while the engine (its own process) is far from done
    n, max_tokens = 48, 480
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": max_tokens, "n": n, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=live.base_url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        next(_stream_lines(resp))
        assert allm.engine.requests  # still generating when the client goes away
    stats = wait_idle(allm, timeout=5.0)
    assert not allm.engine.requests and stats["kv_cache_usage"] == 0.0
    assert allm.engine.num_generated_tokens - tokens_before < n * max_tokens  # aborted, not run to the end


def test_disconnect_before_first_token_aborts(live):
    allm = live.allm
    wait_idle(allm)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 480, "n": 16, "ignore_eos": True}
    with httpx.Client(base_url=live.base_url, timeout=0.2) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body)  # non-streaming: the client gives up waiting
    stats = wait_idle(allm, timeout=3.0)
    assert not allm.engine.requests and stats["kv_cache_usage"] == 0.0


def test_api_key_enforced(tiny_engine):
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL], api_key="s3cret"))
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as http:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                resp = http.post("/v1/completions", json=body, headers=headers)
                assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
            assert http.get("/v1/models").status_code == 401
            assert http.get("/health").status_code == 200 and http.get("/ready").status_code == 200
            ok = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200
            import openai

            client = openai.OpenAI(base_url=srv.v1, api_key="s3cret", max_retries=0)
            assert client.models.list().data[0].id == MODEL
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=srv.v1, api_key="nope", max_retries=0).models.list()
    finally:
        srv.stop()


def _scrape(http) -> dict[str, float]:
    resp = http.get("/metrics")
    assert resp.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                            if s.labels else "")
            samples[key] = s.value
    return samples


def test_metrics_parse_and_count(tiny_engine):
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL]))  # a fresh registry
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as http:
            prompt_total = completion_total = 0
            for i in range(3):
                r = http.post("/v1/completions", json={"model": MODEL, "prompt": f"Hi {i}", "max_tokens": 4 + i,
                                                       "ignore_eos": True}).json()
                prompt_total += r["usage"]["prompt_tokens"]
                completion_total += r["usage"]["completion_tokens"]
            with http.stream("POST", "/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}) as resp:
                usage = [c for c in _stream_lines(resp) if c.get("usage")][-1]["usage"]
            prompt_total += usage["prompt_tokens"]
            completion_total += usage["completion_tokens"]
            # 2 prompts x n=2: 4 sequences, each its TTFT, e2e and prompt tokens (vLLM's 4 engine requests)
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": ["Hi", "Hi there"], "n": 2,
                                                   "max_tokens": 3, "ignore_eos": True}).json()
            prompt_total += 2 * r["usage"]["prompt_tokens"]  # usage counts each prompt once
            completion_total += r["usage"]["completion_tokens"]
            assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "top_p": 3}).status_code == 400
            assert http.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
            m = _scrape(http)
        assert m["meshserve:requests_total{outcome=length}"] == 5
        assert m["meshserve:requests_total{outcome=invalid}"] == 2
        engine = "{engine=0,model_name=tiny}"  # vLLM's labels
        assert m[f"vllm:prompt_tokens_total{engine}"] == prompt_total
        assert m[f"vllm:generation_tokens_total{engine}"] == completion_total == 4 + 5 + 6 + 5 + 4 * 3
        assert m[f"vllm:time_to_first_token_seconds_count{engine}"] == 8
        assert m[f"vllm:e2e_request_latency_seconds_count{engine}"] == 8
        assert m[f"vllm:inter_token_latency_seconds_count{engine}"] == completion_total - 8
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                     "vllm:num_preemptions_total"):
            assert name + engine in m
        assert "meshserve:prefix_cache_hit_rate" in m
        assert 0.0 <= m["meshserve:prefix_cache_hit_rate"] <= 1.0
    finally:
        srv.stop()


def test_queue_full_gets_429_with_retry_after(tiny_engine):
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL], max_queue_len=1, retry_after_s=2))
    client = srv.app.state.engine_client
    release = threading.Event()
    # hold the engine thread between steps, so the first request stays queued while the next one arrives
    blocker = threading.Thread(target=lambda: asyncio.run(tiny_engine.call(lambda: release.wait(30))))
    results: dict[str, dict] = {}
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            blocker.start()
            first = threading.Thread(target=lambda: results.setdefault("a", http.post(
                "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 8}).json()))
            first.start()
            deadline = time.monotonic() + 10
            while client.queue_depth() < 1:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
            assert resp.status_code == 429 and resp.headers["retry-after"] == "2"
            assert resp.json()["error"]["code"] == "server_overloaded"
            release.set()
            first.join(30)
            assert results["a"]["usage"]["completion_tokens"] >= 1
            ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
            assert ok.status_code == 200  # the queue drained, so requests are admitted again
    finally:
        release.set()
        blocker.join(30)
        srv.stop()


def test_draining_refuses_new_requests(tiny_engine):
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL], retry_after_s=3))
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as http:
            assert http.get("/ready").status_code == 200
            srv.state.draining = True
            assert http.get("/ready").status_code == 503
            assert http.get("/health").status_code == 200
            resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
            assert resp.status_code == 503 and resp.headers["retry-after"] == "3"
            assert resp.json()["error"]["type"] == "service_unavailable"
            assert http.get("/version").json()["version"]
    finally:
        srv.stop()


def test_in_flight_counts_each_request_until_it_ends_or_fails():
    """ServerState.in_flight (the server's gate and the router's admission both count through it): what a
    drain waits on, released when the answer raises or is cancelled too."""
    state = ServerState()
    with state.in_flight():
        with state.in_flight():
            assert state.num_in_flight == 2
        assert state.num_in_flight == 1
    for exc in (RuntimeError("handler failed"), asyncio.CancelledError()):
        with pytest.raises(type(exc)), state.in_flight():
            raise exc
    assert state.num_in_flight == 0


def test_serve_cli_flags():
    from meshserve.cli import build_parser
    from meshserve.serve.cli import serve_config_from

    ns = build_parser().parse_args(["serve", "some/model", "--port", "9001", "--api-key", "k",
                                    "--served-model-name", "a", "b", "--max-model-len", "256",
                                    "--max-num-seqs", "8", "--max-queue-len", "5", "-tp", "1"])
    assert ns.model_tag == "some/model" and ns.port == 9001 and ns.max_model_len == 256 and ns.max_num_seqs == 8
    cfg = serve_config_from(ns, ns.model_tag)
    assert cfg.served_model_names == ["a", "b"] and cfg.api_key == ["k"] and cfg.max_queue_len == 5


def test_api_key_from_environment(monkeypatch):
    from meshserve.cli import build_parser

    monkeypatch.setenv("MESHSERVE_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"


def test_an_empty_api_key_variable_is_named_in_the_error(monkeypatch, capsys):
    """VLLM_API_KEY= (set, empty) refuses to start, as an empty --api-key does, but the one-line error names the
    variable: it used to blame --api-key, a flag the command line never gave."""
    from meshserve.cli import main

    monkeypatch.delenv("MESHSERVE_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "")
    assert main(["serve", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "$VLLM_API_KEY" in err and "--api-key:" not in err and len(err.strip().splitlines()) == 1


def test_disconnect_while_echoing_counts_an_abort(tiny_engine, monkeypatch):
    """A client gone while its echoed prompt is decoded (after its requests started) is an abort, not an error."""
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL]))  # a fresh registry
    client = srv.app.state.engine_client

    async def slow_decode(token_ids):
        await asyncio.sleep(30)
        return ""

    monkeypatch.setattr(client, "decode", slow_decode)
    try:
        body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 480, "ignore_eos": True, "echo": True}
        with httpx.Client(base_url=srv.base_url, timeout=1.0) as http:
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json=body)
        wait_idle(tiny_engine, timeout=5.0)
        with httpx.Client(base_url=srv.base_url, timeout=30) as http:
            deadline = time.monotonic() + 5
            while (m := _scrape(http))["meshserve:requests_total{outcome=abort}"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert m["meshserve:requests_total{outcome=abort}"] == 1
        assert m["meshserve:requests_total{outcome=error}"] == 0
    finally:
        srv.stop()
