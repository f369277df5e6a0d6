"""The front end refuses with 429 itself when its own backlog breaks the TTFT target (fake core, fake delays)."""

import time

import httpx
import pytest

from meshserve.bench.fake_core import FakeEngineCore
from meshserve.engine.async_engine import AsyncLLM
from meshserve.engine.core_client import ThreadedCoreClient
from meshserve.engine.messages import CoreInfo
from meshserve.serve.config import ServeConfig
from meshserve.serve.frontend_load import WindowMax
from tests.serve.conftest import start_server


def test_window_max_forgets_after_its_window():
    now = [0.0]
    w = WindowMax(1.0, clock=lambda: now[0])
    w.add(0.4)
    now[0] = 0.7
    w.add(0.1)
    assert w.value() == 0.4
    now[0] = 1.1  # within one to one and a half windows: still seen
    assert w.value() == 0.4
    now[0] = 1.3
    assert w.value() == 0.1
    now[0] = 5.0
    assert w.value() == 0.0


@pytest.fixture(scope="module")
def fake_slo_server():
    info = CoreInfo(model="fake", max_model_len=256, vocab_size=1000, block_size=16, num_blocks=64,
                    max_num_batched_tokens=256, enable_chunked_prefill=True, slo_ttft_s=0.3)
    allm = AsyncLLM(ThreadedCoreClient(FakeEngineCore(info, step_s=0.005)))
    srv = start_server(allm, ServeConfig(served_model_names=["fake"]))
    yield srv
    srv.stop()
    allm.shutdown()


def _post(srv, **extra):
    body = {"model": "fake", "prompt": [5, 6, 7], "max_tokens": 4, **extra}
    t = time.monotonic()
    r = httpx.post(srv.v1 + "/completions", json=body, timeout=30)
    return r, time.monotonic() - t


def test_a_lagging_front_end_answers_429_at_once_and_recovers(fake_slo_server):
    srv = fake_slo_server
    client = srv.app.state.engine_client
    # the same request admitted, measured here to compare with: it is parsed and takes 32 engine steps of 5 ms
    admitted = []
    for _ in range(3):
        r, elapsed = _post(srv, max_tokens=32)
        assert r.status_code == 200  # idle: admitted (and the lag watcher runs from now on)
        admitted.append(elapsed)
    refused = []
    for _ in range(3):
        client.load.loop_lag.add(0.5)  # as if the event loop had just stalled for half a second
        r, elapsed = _post(srv, max_tokens=32)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
        err = r.json()["error"]
        assert err["code"] == "slo_unattainable" and err["type"] == "rate_limit_error"
        refused.append(elapsed)
    client.load.loop_lag.add(0.5)  # /v1/responses is a generation path too: refused at the gate alike
    r = httpx.post(srv.v1 + "/responses", json={"model": "fake", "input": "x"}, timeout=30)
    assert r.status_code == 429 and r.json()["error"]["code"] == "slo_unattainable", r.text
    # answered from the headers and body bytes, no parsing, no engine: faster than the same request admitted.
    # Relative, not an absolute bound (a refusal took 0.24 s at a load of 8 on 2 cores); the fastest of
    # each, so that one stall of a busy machine decides nothing
    assert min(refused) < min(admitted), (refused, admitted)
    # a request with a looser target of its own is judged by its handler, and taken
    r, _ = _post(srv, slo={"ttft_ms": 60_000})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    metrics = httpx.get(srv.base_url + "/metrics").text
    assert 'meshserve:requests_rejected_total{reason="slo_unattainable"} 4.0' in metrics
    assert "meshserve:requests_refused_at_gate_total 4.0" in metrics  # all four before parsing
    # the stall leaves the 1 s window, and requests are taken again (the wait guards against a hang only:
    # on a busy machine the lag watcher may itself see a real stall for a while)
    deadline = time.monotonic() + 30
    time.sleep(1.1)
    while (r := _post(srv)[0]).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200


def test_input_delay_counts_towards_the_ttft_prediction(fake_slo_server):
    client = fake_slo_server.app.state.engine_client
    # any stall an earlier test added has left the window (at once when it already has: no fixed wait)
    deadline = time.monotonic() + 30
    while client.frontend_admission_error() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.frontend_admission_error() is None
    client.load.request_reached_handler(time.monotonic() - 0.4)  # a request waited 0.4 s to reach its handler
    refusal = client.frontend_admission_error()
    assert refusal is not None and refusal.retry_after_s >= 1
