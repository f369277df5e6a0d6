"""The router against scripted fake replicas: passthrough, retries, ejection, fallback, metrics."""

from __future__ import annotations

import json
import socket
import time

import httpx

from meshserve.router.config import RouterConfig
from tests.router.conftest import free_port, metric_value, wait_until

QUIET = {"health_interval_s": 60.0}  # only the passive path acts, unless a test wants probes


def sse_data(resp: httpx.Response) -> list[str]:
    return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def replica_state(router_srv, name: str) -> dict:
    snap = httpx.get(router_srv.base_url + "/router/replicas").json()
    return next(r for r in snap["replicas"] if r["name"] == name)


def test_stream_passes_through_unbuffered_with_api_keys(fake_replicas, router):
    script, up = fake_replicas("a", num_events=5, event_delay_s=0.3)
    r = router(RouterConfig(backends=[up.base_url], **QUIET))
    t0 = time.monotonic()
    headers = {"Authorization": "Bearer sk-test", "X-Api-Key": "sk-test"}
    with httpx.stream("POST", r.base_url + "/v1/completions", headers=headers, timeout=10,
                      json={"model": "tiny", "prompt": "hi", "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-meshserve-replica"] == "primary-0"
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        t_first = time.monotonic() - t0
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    t_all = time.monotonic() - t0
    assert json.loads(first[6:])["choices"][0]["text"] == "a:0 "
    assert t_first < 0.6 and t_all > 1.1  # the first event arrived long before the upstream finished
    assert rest[-1] == "[DONE]" and len(rest) == 5
    sent = script.requests[0]["headers"]
    assert sent["authorization"] == "Bearer sk-test" and sent["x-api-key"] == "sk-test"
    assert script.requests[0]["body"]["prompt"] == "hi"


def test_non_streamed_and_models_are_proxied(fake_replicas, router):
    _, up = fake_replicas("a")
    r = router(RouterConfig(backends=[up.base_url], **QUIET))
    resp = httpx.post(r.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "from a"
    assert resp.headers["x-meshserve-attempts"] == "1" and "x-meshserve-fallback" not in resp.headers
    assert httpx.get(r.base_url + "/v1/models").json()["data"][0]["id"] == "tiny"
    assert httpx.get(r.base_url + "/ready").status_code == 200
    assert httpx.get(r.base_url + "/health").status_code == 200


def test_connection_error_is_retried_and_the_replica_ejected(fake_replicas, router):
    _, gone = fake_replicas("gone")
    _, ok = fake_replicas("ok")
    r = router(RouterConfig(backends=[gone.base_url, ok.base_url], policy="round-robin", **QUIET))
    assert replica_state(r, "primary-0")["healthy"]
    gone.stop()  # the router still believes it healthy: only a request can find out
    results = [httpx.post(r.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x", "stream": s})
               for s in (False, True, False, True)]
    assert all(res.status_code == 200 for res in results)
    assert all(res.headers["x-meshserve-replica"] == "primary-1" for res in results)
    assert results[0].headers["x-meshserve-attempts"] == "2"  # the first hit the dead replica, then retried
    state = replica_state(r, "primary-0")
    assert not state["healthy"] and "connection failed" in state["last_error"]
    assert "meshserve:router_retries_total 1.0" in httpx.get(r.base_url + "/metrics").text


def test_refusals_are_retried_elsewhere_and_passed_on_when_everyone_refuses(fake_replicas, router):
    busy, a = fake_replicas("busy", mode="status", status=429)
    _, b = fake_replicas("ok")
    r = router(RouterConfig(backends=[a.base_url, b.base_url], policy="round-robin", **QUIET))
    for _ in range(4):
        resp = httpx.post(r.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert resp.status_code == 200 and resp.headers["x-meshserve-replica"] == "primary-1"
    assert replica_state(r, "primary-0")["healthy"]  # a full queue is not a sick replica
    busy2, c = fake_replicas("busy2", mode="status", status=429)
    r2 = router(RouterConfig(backends=[a.base_url, c.base_url], **QUIET))
    t0 = time.monotonic()
    resp = httpx.post(r2.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert resp.status_code == 429 and resp.headers["retry-after"] == "7"
    assert resp.json()["error"]["code"] == 429 and time.monotonic() - t0 < 1
    assert len(busy.requests) >= 1 and len(busy2.requests) == 1


def test_503_ejects_and_4xx_is_final(fake_replicas, router):
    _, draining = fake_replicas("draining", mode="status", status=503)
    _, ok = fake_replicas("ok")
    r = router(RouterConfig(backends=[draining.base_url, ok.base_url], policy="round-robin", **QUIET))
    assert httpx.post(r.base_url + "/v1/completions", json={"prompt": "x"}).status_code == 200
    assert not replica_state(r, "primary-0")["healthy"]
    bad_script, bad = fake_replicas("bad", mode="status", status=400)
    r2 = router(RouterConfig(backends=[bad.base_url, ok.base_url], policy="round-robin", **QUIET))
    resp = httpx.post(r2.base_url + "/v1/completions", json={"prompt": "x"})
    assert resp.status_code == 400 and len(bad_script.requests) == 1  # the request's fault: no retry


def test_stream_broken_mid_way_ends_with_one_clean_error_and_no_splice(fake_replicas, router):
    _, dying = fake_replicas("dying", mode="die_midstream")
    _, ok = fake_replicas("ok")
    r = router(RouterConfig(backends=[dying.base_url, ok.base_url], policy="round-robin", **QUIET))
    with httpx.stream("POST", r.base_url + "/v1/completions", timeout=10,
                      json={"model": "tiny", "prompt": "x", "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["x-meshserve-replica"] == "primary-0"
        data = sse_data(resp)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks if "choices" in c]
    assert texts == ["dying:0 ", "dying:1 "]  # nothing from the other replica, nothing repeated
    assert chunks[-1]["error"]["code"] == "upstream_stream_broken"
    assert sum("error" in c for c in chunks) == 1
    assert not replica_state(r, "primary-0")["healthy"]
    metrics = httpx.get(r.base_url + "/metrics").text
    assert 'meshserve:router_requests_total{outcome="stream_broken"} 1.0' in metrics


def test_stream_failing_before_its_first_event_is_retried(fake_replicas, router):
    _, dying = fake_replicas("dying", mode="die_before_first")
    _, ok = fake_replicas("ok")
    r = router(RouterConfig(backends=[dying.base_url, ok.base_url], policy="round-robin", **QUIET))
    with httpx.stream("POST", r.base_url + "/v1/completions", timeout=10,
                      json={"model": "tiny", "prompt": "x", "stream": True}) as resp:
        assert resp.headers["x-meshserve-replica"] == "primary-1"
        assert resp.headers["x-meshserve-attempts"] == "2"
        data = sse_data(resp)
    assert data[-1] == "[DONE]" and all("ok:" in json.loads(d)["choices"][0]["text"] for d in data[:-1])


def test_hung_replica_is_ejected_by_the_timeout_path(fake_replicas, router):
    hung_script, hung = fake_replicas("hung")
    _, ok = fake_replicas("ok")
    r = router(RouterConfig(backends=[hung.base_url, ok.base_url], policy="round-robin", read_timeout_s=0.5,
                            **QUIET))
    hung_script.mode = "hang"  # only now that the router admitted it: it accepts, then never answers
    t0 = time.monotonic()
    resp = httpx.post(r.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=10)
    assert resp.status_code == 200 and resp.headers["x-meshserve-replica"] == "primary-1"
    assert resp.headers["x-meshserve-attempts"] == "2" and time.monotonic() - t0 < 3
    state = replica_state(r, "primary-0")
    assert not state["healthy"] and "timed out" in state["last_error"]


def test_fallback_serves_when_primaries_are_down_then_fast_503(fake_replicas, router):
    down_script, down = fake_replicas("down", ready_status=503)
    fb_script, fb = fake_replicas("fb")
    r = router(RouterConfig(backends=[down.base_url], fallbacks=[fb.base_url], fallback_model="small",
                            health_interval_s=0.1, health_timeout_s=0.5, fail_threshold=1))
    resp = httpx.post(r.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "from fb"
    assert resp.headers["x-meshserve-fallback"] == "primaries_unavailable"
    assert fb_script.requests[-1]["body"]["model"] == "small" and not down_script.requests
    fb_script.ready_status = 503
    assert wait_until(lambda: not replica_state(r, "fallback-0")["healthy"], 5)
    assert httpx.get(r.base_url + "/ready").status_code == 503
    t0 = time.monotonic()
    resp = httpx.post(r.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert time.monotonic() - t0 < 0.5
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["code"] == "no_replica_available"


def test_fallback_takes_over_past_the_queue_threshold(fake_replicas, router):
    _, slow = fake_replicas("slow", num_events=4, event_delay_s=0.4)
    _, fb = fake_replicas("fb")
    r = router(RouterConfig(backends=[slow.base_url], fallbacks=[fb.base_url], fallback_queue_threshold=1,
                            **QUIET))
    with httpx.stream("POST", r.base_url + "/v1/completions", json={"prompt": "x", "stream": True}) as first:
        assert first.headers["x-meshserve-replica"] == "primary-0"
        resp = httpx.post(r.base_url + "/v1/completions", json={"prompt": "y"})
        assert resp.headers["x-meshserve-fallback"] == "queue_depth" and resp.json()["choices"][0]["text"] == \
            "from fb"
        sse_data(first)


def test_active_health_checks_eject_and_readmit(fake_replicas, router):
    script, up = fake_replicas("a")
    r = router(RouterConfig(backends=[up.base_url], health_interval_s=0.05, health_timeout_s=0.5,
                            fail_threshold=3, recover_threshold=2))
    assert replica_state(r, "primary-0")["healthy"]
    script.ready_status = 503
    assert wait_until(lambda: not replica_state(r, "primary-0")["healthy"], 5)
    assert "answered 503" in replica_state(r, "primary-0")["last_error"]
    script.ready_status = 200
    assert wait_until(lambda: replica_state(r, "primary-0")["healthy"], 5)
    state = replica_state(r, "primary-0")
    assert state["num_ejections"] == 1 and state["num_admissions"] == 2
    assert httpx.post(r.base_url + "/v1/completions", json={"prompt": "x"}).status_code == 200


def test_queue_depth_and_desired_replicas_are_exported(fake_replicas, router):
    _, slow = fake_replicas("slow", num_events=3, event_delay_s=0.5)
    r = router(RouterConfig(backends=[slow.base_url], target_queue_per_replica=2, health_interval_s=0.1))
    with httpx.Client(timeout=10) as client:
        cms = [client.stream("POST", r.base_url + "/v1/completions", json={"prompt": "x", "stream": True})
               for _ in range(5)]  # keep the context managers: dropping one closes its response
        streams = [cm.__enter__() for cm in cms]
        metrics = httpx.get(r.base_url + "/metrics").text
        assert "meshserve:router_queue_depth 5.0" in metrics
        assert "meshserve:router_desired_replicas 3.0" in metrics  # ceil(5 / 2)
        assert "meshserve:router_upstream_waiting 3.0" in metrics  # scraped from the replica
        for s in streams:
            assert sse_data(s)[-1] == "[DONE]"
            s.close()
    assert wait_until(lambda: "meshserve:router_desired_replicas 1.0" in httpx.get(r.base_url + "/metrics").text,
                      5)


def test_router_past_max_outstanding_answers_503_at_once(fake_replicas, router):
    _, slow = fake_replicas("slow", num_events=3, event_delay_s=0.5)
    r = router(RouterConfig(backends=[slow.base_url], max_outstanding=2, **QUIET))
    with httpx.Client(timeout=10) as client:
        cms = [client.stream("POST", r.base_url + "/v1/completions", json={"prompt": "x", "stream": True})
               for _ in range(2)]
        streams = [cm.__enter__() for cm in cms]
        t0 = time.monotonic()
        resp = client.post(r.base_url + "/v1/completions", json={"prompt": "x"})
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["code"] == "router_overloaded" and time.monotonic() - t0 < 0.3
        for s in streams:
            s.close()


def test_prefix_affinity_keeps_a_prefix_on_one_replica(fake_replicas, router):
    ups = [fake_replicas(f"r{i}")[1] for i in range(3)]
    r = router(RouterConfig(backends=[u.base_url for u in ups], policy="prefix-affinity", **QUIET))
    served: dict[int, set[str]] = {}
    for doc in range(6):
        for q in range(4):
            prompt = f"Document {doc}: " + "lorem ipsum " * 30 + f"question {q}"
            resp = httpx.post(r.base_url + "/v1/completions", json={"prompt": prompt})
            served.setdefault(doc, set()).add(resp.headers["x-meshserve-replica"])
    assert all(len(s) == 1 for s in served.values())  # each prefix stayed on one replica
    assert len(set().union(*served.values())) >= 2  # and prefixes were spread


def test_no_backend_reachable_at_start_is_a_fast_503():
    from meshserve.router.app import build_router_app
    from tests.router.conftest import serve_in_thread

    srv = serve_in_thread(build_router_app(RouterConfig(backends=[f"http://127.0.0.1:{free_port()}"], **QUIET)))
    try:
        assert httpx.get(srv.base_url + "/ready").status_code == 503
        resp = httpx.post(srv.base_url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 503 and "retry-after" in resp.headers
    finally:
        srv.stop()


def test_client_leaving_cancels_the_upstream_call(fake_replicas, router):
    script, up = fake_replicas("a")
    r = router(RouterConfig(backends=[up.base_url], read_timeout_s=60, **QUIET))
    script.mode = "hang"
    try:
        httpx.post(r.base_url + "/v1/completions", json={"prompt": "x"}, timeout=0.5)
    except httpx.TimeoutException:
        pass
    assert replica_state(r, "primary-0")["outstanding"] in (0, 1)
    assert wait_until(lambda: replica_state(r, "primary-0")["outstanding"] == 0, 3)  # not after 60 s
    assert replica_state(r, "primary-0")["healthy"]  # the client left: not the replica's fault


def test_client_gone_before_its_stream_starts_releases_the_replica(fake_replicas, router):
    """Clients that send a stream request and leave before its first event: each attempt still ends (the
    replica's outstanding count back to 0, its connection closed). Starlette cancels such a response before
    iterating its body, and the relay's release, in the relay's finally, never ran: each held an outstanding
    count (the least-loaded policy and the autoscaler's queue depth) and a connection to the replica."""
    _, up = fake_replicas("a", num_events=50, first_event_delay_s=0.3)
    r = router(RouterConfig(backends=[up.base_url], **QUIET))
    host, port = r.base_url.removeprefix("http://").split(":")
    body = json.dumps({"model": "tiny", "prompt": "x", "stream": True}).encode()
    for _ in range(5):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        # closed while the router waits for the first event
    assert wait_until(lambda: replica_state(r, "primary-0")["num_requests"] == 5, 5)
    assert wait_until(lambda: replica_state(r, "primary-0")["outstanding"] == 0, 5)
    assert replica_state(r, "primary-0")["healthy"]  # the clients left: not the replica's fault


def test_dns_discovery_finds_and_drops_replicas(fake_replicas, router):
    _, up = fake_replicas("a")
    port = up.base_url.rsplit(":", 1)[1]
    r = router(RouterConfig(discover=[f"localhost:{port}"], health_interval_s=0.1))
    names = {x["name"] for x in httpx.get(r.base_url + "/router/replicas").json()["replicas"]}
    assert f"http://127.0.0.1:{port}" in names
    resp = httpx.post(r.base_url + "/v1/completions", json={"prompt": "x"})
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "from a"


def test_pool_sync_keeps_static_backends_and_drops_vanished_ones():
    from meshserve.router.pool import ReplicaPool

    pool = ReplicaPool(RouterConfig(backends=["http://static:1"], discover=["svc:1"]))
    pool.sync_primaries(["http://10.0.0.1:1", "http://10.0.0.2:1"], static=["http://static:1"])
    assert {r.url for r in pool.primaries} == {"http://static:1", "http://10.0.0.1:1", "http://10.0.0.2:1"}
    gone = pool.find("http://10.0.0.2:1")
    pool.sync_primaries(["http://10.0.0.1:1"], static=["http://static:1"])
    assert {r.url for r in pool.primaries} == {"http://static:1", "http://10.0.0.1:1"}
    assert gone.removed and not gone.healthy


def test_x_request_id_passes_through_both_ways(router):
    # the client's X-Request-Id reaches the replica (which names the request by it) and the replica's
    # X-Request-Id (--enable-request-id-headers) comes back, streamed or not
    from meshserve.serve.middleware import RequestIdHeaderMiddleware
    from tests.router.conftest import Script, fake_replica_app, serve_in_thread

    script = Script("a")
    app = fake_replica_app(script)
    app.add_middleware(RequestIdHeaderMiddleware)
    up = serve_in_thread(app)
    try:
        r = router(RouterConfig(backends=[up.base_url], **QUIET))
        for stream in (False, True):
            with httpx.stream("POST", r.base_url + "/v1/completions", headers={"X-Request-Id": f"trace-{stream}"},
                              json={"model": "tiny", "prompt": "x", "stream": stream}, timeout=10) as resp:
                resp.read()
                assert resp.status_code == 200 and resp.headers.get_list("x-request-id") == [f"trace-{stream}"]
            assert script.requests[-1]["headers"]["x-request-id"] == f"trace-{stream}"
        resp = httpx.post(r.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert len(resp.headers["x-request-id"]) == 32  # the replica's own, passed on
    finally:
        up.stop()


def test_the_openapi_schema_has_one_operation_a_route_and_method():
    """The schema builds without FastAPI's duplicate-operation-id warning: the proxied Responses routes of two
    methods (GET and DELETE /v1/responses/{response_id}) are one route a method."""
    import warnings

    from meshserve.router.app import build_router_app

    app = build_router_app(RouterConfig(backends=[f"http://127.0.0.1:{free_port()}"], **QUIET))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schema = app.openapi()
    assert set(schema["paths"]["/v1/responses/{response_id}"]) == {"get", "delete"}
    ids = [op["operationId"] for item in schema["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


PREFILL_UNAVAILABLE = 'meshserve:router_fallback_requests_total{reason="prefill_unavailable"}'


def test_a_concurrent_prefill_leg_that_succeeds_is_no_fallback(fake_replicas, router, caplog):
    """--disagg-concurrent: the prefill leg's success (run_prefill's decode-leg params) is not counted as the
    prefill pool being unavailable, nor logged as a failed leg (both happened for every request from when the
    leg began returning the prefill's handle, a dict, where the check still expected a string); a prefill
    instance that answers 503 is (ejected, it leaves no instance for the leg)."""
    prefill_script, prefill = fake_replicas("prefill")
    decode_script, decode = fake_replicas("decode")
    r = router(RouterConfig(backends=[decode.base_url], prefills=[prefill.base_url], disagg_concurrent=True,
                            **QUIET))

    def failed_legs() -> list[str]:
        return [m for m in (rec.getMessage() for rec in caplog.records) if "prefill leg failed" in m]

    with caplog.at_level("WARNING", logger="meshserve.router"):
        resp = httpx.post(r.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=10)
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "from decode"
        assert wait_until(lambda: len(prefill_script.requests) == 1, 5)
        transfer = decode_script.requests[0]["body"]["kv_transfer_params"]["transfer_id"]
        assert prefill_script.requests[0]["body"]["kv_transfer_params"]["transfer_id"] == transfer
        prefill_script.mode, prefill_script.status = "status", 503
        httpx.post(r.base_url + "/v1/completions", json={"model": "tiny", "prompt": "y"}, timeout=10)
        # (the second leg's end is logged after the first's: once it is, both legs' callbacks have run)
        assert wait_until(lambda: any("no prefill instance" in m for m in failed_legs()), 5)
    assert failed_legs() == ["concurrent prefill leg failed (no prefill instance)"]  # (ejected at its 503)
    assert metric_value(r.base_url, PREFILL_UNAVAILABLE) == 1
