"""Service-level targets through the server: fast 429s when a target cannot be met, shed requests get the
same clean error, priorities and per-request targets are accepted, and nothing hangs under a burst."""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import pytest

from meshserve.engine.admission_margin import AdmissionMargin, MarginRule
from meshserve.engine.messages import SchedulerStats
from meshserve.serve.config import ServeConfig
from tests.serve.conftest import make_engine, start_server


@pytest.fixture(scope="module")
def slo_server(tiny_model_dir):
    # the priority queue: the burst below sends priorities (refused under fcfs)
    allm = make_engine(tiny_model_dir("llama"), slo_ttft_ms=500, max_num_seqs=4, scheduling_policy="priority")
    live = start_server(allm, ServeConfig(served_model_names=["tiny"]))
    yield live
    live.stop()
    allm.shutdown()


def _body(**extra) -> dict:
    return {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 4, "ignore_eos": True, **extra}


def _metric(base_url: str, prefix: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_a_request_that_cannot_meet_its_ttft_is_refused_at_once(slo_server):
    allm = slo_server.allm
    prompt_tokens_before = allm.engine.num_prompt_tokens
    allm._stats = SchedulerStats(queue_wait_s=5.0, prefill_s_per_token=1e-4)  # a long queue, as if overloaded
    t = time.monotonic()
    r = httpx.post(slo_server.v1 + "/completions", json=_body(), timeout=30)
    elapsed = time.monotonic() - t
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["code"] == "slo_unattainable" and err["type"] == "rate_limit_error"
    assert elapsed < 1.0 and allm.engine.num_prompt_tokens == prompt_tokens_before  # never reached the core
    # a request with a looser target of its own is taken
    r = httpx.post(slo_server.v1 + "/completions", json=_body(slo={"ttft_ms": 60_000}), timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert _metric(slo_server.base_url, 'meshserve:requests_rejected_total{reason="slo_unattainable"}') >= 1


def test_an_admitted_request_near_the_limit_teaches_the_admission_margin(slo_server, monkeypatch):
    allm = slo_server.allm
    errors_before = list(allm.admission_margin._errors)
    # predicted 0.3 s against the 0.5 s target: near the limit, under the margin (0.8 x 0.5 s)
    monkeypatch.setattr(allm, "predicted_ttft_s", lambda *args: 0.3)
    t = time.monotonic()
    r = httpx.post(slo_server.v1 + "/completions", json=_body(), timeout=30)
    elapsed = time.monotonic() - t
    assert r.status_code == 200
    errors = list(allm.admission_margin._errors)
    assert errors[: len(errors_before)] == errors_before and len(errors) == len(errors_before) + 1
    # (measured - predicted) / target, measured from the server's arrival to the first token: within what the
    # client itself waited (not "before 0.3 s": a loaded CI machine can take longer over an empty queue)
    assert -0.6 < errors[-1] <= (elapsed - 0.3) / 0.5


def test_metrics_show_the_admission_margin_and_follow_its_updates(slo_server, monkeypatch):
    allm = slo_server.allm
    # a server of its own around a fresh controller (the module's server keeps the margin its tests taught it)
    margin = AdmissionMargin(MarginRule(min_samples=16, update_every=16))
    monkeypatch.setattr(allm, "admission_margin", margin)
    live = start_server(allm, ServeConfig(served_model_names=["tiny"]))
    try:
        assert _metric(live.base_url, "meshserve:admission_margin ") == 0.8
        assert _metric(live.base_url, "meshserve:admission_margin_updates_total ") == 0
        assert math.isnan(_metric(live.base_url, "meshserve:admission_margin_ttft_error "))
        for _ in range(16):  # first tokens 0.1 s later than predicted against the 0.5 s target: 0.2 of it
            margin.observe(0.3, 0.4, 0.5)
        assert margin.num_updates == 1 and margin.value < 0.8
        assert _metric(live.base_url, "meshserve:admission_margin ") == pytest.approx(margin.value)
        assert _metric(live.base_url, "meshserve:admission_margin_updates_total ") == 1
        assert _metric(live.base_url, "meshserve:admission_margin_ttft_error ") == pytest.approx(0.2)
        # the exported margin is the one admission uses: a prediction between it and 0.8 of the target is refused
        monkeypatch.setattr(allm, "predicted_ttft_s", lambda *args: 0.5 * (margin.value + 0.8) / 2)
        r = httpx.post(live.v1 + "/completions", json=_body(), timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "slo_unattainable"
    finally:
        live.stop()


def test_a_request_shed_in_the_queue_gets_the_same_clean_429(slo_server):
    allm = slo_server.allm
    model = allm.engine.step_model

    async def slow_prefill(theta):  # on the core's thread: a step-time model that finds prefill very slow
        return await allm.call(lambda: setattr(model, "_theta", theta))

    saved = model._theta
    asyncio.run(slow_prefill((saved[0], 1e6, saved[2], saved[3])))
    try:
        deadline = time.monotonic() + 5
        while allm._stats.prefill_s_per_token < 1.0:  # the core publishes its counters after the command
            assert time.monotonic() < deadline
            time.sleep(0.01)
        allm._stats = SchedulerStats()  # then the front end's view: an idle engine, so it admits
        shed_before = _metric(slo_server.base_url, "meshserve:requests_shed_total")
        r = httpx.post(slo_server.v1 + "/completions", json=_body(), timeout=30)
        # shed from the queue: the same 429, its code telling it from a refusal at arrival
        assert r.status_code == 429 and r.json()["error"]["code"] == "slo_shed"
        assert r.json()["error"]["type"] == "rate_limit_error" and "retry-after" in r.headers
        assert _metric(slo_server.base_url, 'meshserve:requests_rejected_total{reason="slo_shed"}') >= 1
        deadline = time.monotonic() + 5
        while _metric(slo_server.base_url, "meshserve:requests_shed_total") < shed_before + 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        asyncio.run(slow_prefill(saved))


def test_bad_service_level_fields_are_400(slo_server):
    for extra in ({"slo": {"ttft_ms": -1}}, {"priority": "high"}, {"slo": {"tpot_ms": 0}}):
        r = httpx.post(slo_server.v1 + "/completions", json=_body(**extra), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", extra


def test_a_burst_gets_answers_or_429s_and_nothing_hangs(slo_server):
    # the TTFT target scales with this host's speed: at least the engine's 4 slots start at once, and each
    # first token comes well within one whole request's time alone. The prediction counts the front end's
    # own delay (time since arrival, the event loop's worst lag of the last second): on a loaded 2-core CI
    # host a stall near the burst put every request of a 0.5 s target past it (all 40 refused), so the floor
    # is 2 s (the 429 paths have their own tests above; this one is about the burst ending cleanly)
    t = time.monotonic()
    assert httpx.post(slo_server.v1 + "/completions", json=_body(prompt=[3] * 40, max_tokens=24),
                      timeout=60).status_code == 200
    ttft_ms = max(2000.0, 4e3 * (time.monotonic() - t))

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, int]:
        body = _body(prompt=[3 + i % 50] * 40, max_tokens=24, stream=True, priority=i % 3,
                     stream_options={"include_usage": True}, slo={"ttft_ms": ttft_ms})
        async with client.stream("POST", slo_server.v1 + "/completions", json=body) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data:")]
        if r.status_code == 200:
            assert lines[-1] == "data: [DONE]" and '"completion_tokens":24' in lines[-2].replace(" ", "")
        return r.status_code, len(lines)

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(40)))

    met_before = _metric(slo_server.base_url, 'meshserve:requests_slo_total{result="met"}')
    results = asyncio.run(burst())
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 4
    served = statuses.count(200)
    counted = (_metric(slo_server.base_url, 'meshserve:requests_slo_total{result="met"}') - met_before
               + _metric(slo_server.base_url, 'meshserve:requests_slo_total{result="missed"}'))
    assert counted >= served  # every served request was judged against its target


def test_a_tpot_target_no_batch_meets_is_served_alone_not_held_forever(slo_server):
    """slo.tpot_ms of 1e-300 (found by fuzzing /v1/responses) held the request in the queue forever, and every
    request behind it: it now runs alone, and a plain request sent beside it is answered too."""
    async def both():
        async with httpx.AsyncClient(base_url=slo_server.v1, timeout=30) as http:
            return await asyncio.gather(
                http.post("/completions", json=_body(slo={"ttft_ms": 60_000, "tpot_ms": 1e-300})),
                http.post("/completions", json=_body(slo={"ttft_ms": 60_000})))

    for r in asyncio.run(both()):
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
