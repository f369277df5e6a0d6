"""An arrival refusal is decided in the API process: it never waits on the engine core (issue 18).

The core here reports a 30 s queue and then hangs in its step: a refusal that needed the core (a round trip, a
step) would hang with it. Speed is not asserted here (benchmarks measure it); the structure is.
"""

import threading
import time

import httpx
import pytest

from meshserve.bench.fake_core import FakeEngineCore
from meshserve.engine.async_engine import AsyncLLM
from meshserve.engine.core_client import ThreadedCoreClient
from meshserve.engine.messages import CoreInfo
from meshserve.serve.config import ServeConfig
from tests.serve.conftest import start_server


class StuckCore(FakeEngineCore):
    """Publishes a 30 s queue wait once it has work, then blocks in step() until released."""

    def __init__(self, info: CoreInfo):
        super().__init__(info, step_s=0.001)
        self.stuck = threading.Event()
        self.release = threading.Event()

    def _queue_wait_s(self) -> float:
        return 30.0 if self.has_unfinished_requests() else 0.0

    def step(self):
        self.stuck.set()
        self.release.wait(120)
        return super().step()


@pytest.fixture()
def stuck_server():
    info = CoreInfo(model="fake", max_model_len=256, vocab_size=1000, block_size=16, num_blocks=64,
                    max_num_batched_tokens=256, enable_chunked_prefill=True, slo_ttft_s=1.0)
    core = StuckCore(info)
    allm = AsyncLLM(ThreadedCoreClient(core))
    srv = start_server(allm, ServeConfig(served_model_names=["fake"]))
    yield srv, core
    core.release.set()
    srv.stop()
    allm.shutdown()


def _post(srv, **extra) -> httpx.Response:
    body = {"model": "fake", "prompt": [5, 6, 7], "max_tokens": 2, **extra}
    return httpx.post(srv.v1 + "/completions", json=body, timeout=30)


def test_an_arrival_refusal_does_not_wait_on_a_stuck_core(stuck_server):
    srv, core = stuck_server
    first: list[httpx.Response] = []
    admitted = threading.Thread(target=lambda: first.append(_post(srv)), daemon=True)
    admitted.start()  # an idle server admits it; the core takes it, publishes its 30 s queue, and hangs
    assert core.stuck.wait(30), "the core never started its step"
    deadline = time.monotonic() + 30
    while srv.allm.stats_snapshot()[0]["queue_wait_s"] != 30.0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the stats it published after taking the request, before its step
    assert srv.allm.stats_snapshot()[0]["queue_wait_s"] == 30.0

    # refused by the gate (the server's target), streamed or not, and by the handler (the request's own target)
    for extra in ({}, {"stream": True}, {"slo": {"ttft_ms": 5000}}):
        r = _post(srv, **extra)
        assert r.status_code == 429, (extra, r.text)
        assert r.headers["content-type"] == "application/json" and int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "slo_unattainable" and error["type"] == "rate_limit_error", error

    # all of that while the core was stuck: the admitted request is still unanswered, and the refused ones
    # never reached the core (only the first request is in its queue)
    assert admitted.is_alive() and not first
    assert len(core.waiting) == 1 and not core.running
    core.release.set()
    admitted.join(30)
    assert first and first[0].status_code == 200, first
