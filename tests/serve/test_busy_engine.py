"""While the engine core is busy in a long step, the front end still answers: /metrics from the counters the
core published (never zeros), and bad requests are refused at once, without waiting for the step."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from meshserve.serve.config import ServeConfig
from tests.serve.conftest import make_engine, start_server

STEP_S = 3.0  # long enough that an answer which waited for the step is unmistakable


class _SlowExecutor:
    """The real executor, with every step held (a long prefill, made on purpose) until the test opens the
    gate or STEP_S passes: a test that has seen what it needs lets the step end instead of sleeping it out."""

    def __init__(self, inner):
        self._inner = inner
        self.gate = threading.Event()
        self.in_step = threading.Event()

    def execute(self, sched_out):
        if sched_out.scheduled:
            self.in_step.set()
            self.gate.wait(STEP_S)
        return self._inner.execute(sched_out)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.fixture(scope="module")
def busy(tiny_model_dir):
    allm = make_engine(tiny_model_dir("llama"), async_scheduling=False)
    live = start_server(allm, ServeConfig(served_model_names=["tiny"]))
    core = allm.engine
    core.executor = _SlowExecutor(core.executor)  # the core is idle until the first request
    live.slow = core.executor
    yield live
    core.executor = core.executor._inner
    live.stop()
    allm.shutdown()


@pytest.fixture
def held(busy):
    """The busy server with its steps held for this test; opened at the end, whatever happened."""
    busy.slow.gate.clear()
    busy.slow.in_step.clear()
    yield busy
    busy.slow.gate.set()


def _gauges(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics", timeout=5).text
    return {line.split("{")[0].split()[0]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{",
                                "meshserve:engine_stats_age"))}


def _wait_for_requests(base_url: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        g = _gauges(base_url)
        if g["vllm:num_requests_running"] + g["vllm:num_requests_waiting"] == n:
            return
        assert time.monotonic() < deadline, g
        time.sleep(0.05)


def _send_in_background(url: str, n: int) -> list[threading.Thread]:
    def one():
        # one token: the prefill step finishes it, so a request costs one slow step, not two
        httpx.post(url, json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 1, "ignore_eos": True},
                   timeout=60)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_metrics_during_a_long_step_show_the_requests_and_their_age(held):
    busy = held
    threads = _send_in_background(busy.v1 + "/completions", 3)
    _wait_for_requests(busy.base_url, 3)  # the server has them (the core takes them and enters its slow step)
    ages = []
    for _ in range(3):
        t = time.monotonic()
        g = _gauges(busy.base_url)
        assert time.monotonic() - t < STEP_S / 3  # a scrape never waits on the core
        assert g["vllm:num_requests_running"] + g["vllm:num_requests_waiting"] == 3
        ages.append(g["meshserve:engine_stats_age_seconds"])
        time.sleep(0.4)
    assert ages == sorted(ages) and ages[-1] >= 0.6  # stale, and saying so
    busy.slow.gate.set()
    for t in threads:
        t.join(30)
    assert _gauges(busy.base_url)["vllm:num_requests_running"] == 0


def test_bad_requests_are_refused_without_waiting_for_the_step(held):
    busy = held
    threads = _send_in_background(busy.v1 + "/completions", 2)
    _wait_for_requests(busy.base_url, 2)
    assert busy.slow.in_step.wait(STEP_S)  # the core has taken them and is inside its slow step
    for body in ({"model": "tiny", "prompt": ""}, {"model": "tiny", "prompt": [5], "max_tokens": 10_000},
                 {"model": "tiny", "prompt": [999_999]}):
        t = time.monotonic()
        r = httpx.post(busy.v1 + "/completions", json=body, timeout=30)
        assert r.status_code == 400 and time.monotonic() - t < STEP_S / 3, body
    busy.slow.gate.set()
    for t in threads:
        t.join(30)
