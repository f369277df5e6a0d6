"""`serve --data-parallel-size 2` (internal back end): one API front end over two engine-core processes.

Requests go to both cores and stream back directly, with the tokens one core gives; a client that leaves
aborts on the core that holds its request; the front end's 429 still comes at once; nothing outlives the
server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from meshserve.bench.fake_core import fake_core_factory
from meshserve.config import EngineArgs
from meshserve.serve.api_server import _start_data_parallel
from meshserve.serve.config import ServeConfig
from tests.process_tree import children as process_children
from tests.process_tree import alive, started_by
from tests.serve.conftest import MODEL, free_port, start_server


def _serve_dp(engine_args: EngineArgs, core_factory=None):
    allm = _start_data_parallel(engine_args, 2, core_factory)  # the path `meshserve serve -dp 2` takes
    srv = start_server(allm, ServeConfig(served_model_names=[MODEL]))
    procs = [c.proc for c in allm.core_client.clients]
    return srv, procs


def _stop(srv, procs) -> None:
    srv.stop()
    srv.allm.shutdown()
    assert not any(p.is_alive() for p in procs)  # graceful: every core process stopped and joined


@pytest.fixture(scope="module")
def dp_live(tiny_model_dir):
    srv, procs = _serve_dp(EngineArgs(model=tiny_model_dir("llama"), max_model_len=512))
    yield srv
    _stop(srv, procs)


async def _stream_text(client: httpx.AsyncClient, url: str, body: dict) -> str:
    text = []
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += [c["text"] for c in json.loads(line[6:])["choices"]]
    return "".join(text)


def test_streams_from_both_cores_with_the_tokens_of_one(dp_live, live):
    bodies = [
        {
            "model": MODEL,
            "prompt": [5 + i, 9, 11, 4 * i + 3],
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": True,
        }
        for i in range(6)
    ]
    dp = dp_live.allm.core_client
    before = list(dp.num_requests)

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *[_stream_text(client, dp_live.v1 + "/completions", b) for b in bodies]
            )

    streamed = asyncio.run(run())
    assert all(n > b for n, b in zip(dp.num_requests, before))  # both cores served some
    expected = [
        httpx.post(live.v1 + "/completions", json=b, timeout=60).json()["choices"][0]["text"] for b in bodies
    ]
    assert streamed == expected  # greedy: what the one-core server gives
    assert dp._outstanding == [0, 0] and not dp._core_of
    health = httpx.get(dp_live.base_url + "/health", timeout=10)
    assert health.status_code == 200
    metrics = httpx.get(dp_live.base_url + "/metrics", timeout=10).text
    generated = 0.0
    for engine in ("0", "1"):  # vLLM's series per core (engine label): each core's gauges and its sequences'
        assert f'vllm:num_requests_running{{engine="{engine}",model_name="tiny"}} 0.0' in metrics
        line = f'vllm:generation_tokens_total{{engine="{engine}",model_name="tiny"}} '
        (count,) = [float(s[len(line):]) for s in metrics.splitlines() if s.startswith(line)]
        assert count > 0  # both cores served some
        generated += count
    assert generated == 48


@pytest.fixture(scope="module")
def fake_dp(tiny_model_dir):
    """Fake cores (engine cost fixed: one sequence each, 50 ms steps) under a 150 ms TTFT target."""
    args = EngineArgs(model=tiny_model_dir("llama"), device="cpu", max_model_len=512, slo_ttft_ms=150)
    srv, procs = _serve_dp(args, fake_core_factory(0.05, max_num_seqs=1))
    yield srv
    _stop(srv, procs)


def test_refusals_stay_fast_when_every_core_is_busy(fake_dp):
    """Once both cores are busy a new request's predicted TTFT breaks the target on either, and the front end
    answers 429 at once; the first two went one to each core."""
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 40, "ignore_eos": True}
    dp = fake_dp.allm.core_client
    before = list(dp.num_requests)

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            first = [
                asyncio.ensure_future(client.post(fake_dp.v1 + "/completions", json=body)) for _ in range(2)
            ]
            deadline = time.monotonic() + 30
            while not all(st.num_running for st in dp._stats):  # both running, as their cores have said
                assert time.monotonic() < deadline, "the cores never reported the first two running"
                await asyncio.sleep(0.02)
            t0 = time.monotonic()
            late = await client.post(fake_dp.v1 + "/completions", json=body)
            late_s = time.monotonic() - t0
            return await asyncio.gather(*first), late, late_s

    first, late, late_s = asyncio.run(run())
    assert [r.status_code for r in first] == [200, 200]
    assert [n - b for n, b in zip(dp.num_requests, before)] == [1, 1]
    assert late.status_code == 429 and int(late.headers["retry-after"]) >= 1, late.text
    assert late_s < 1.0, late.text  # refused by this process, not after waiting on a core


@pytest.mark.slow
def test_a_client_that_leaves_aborts_on_its_core(fake_dp):
    dp = fake_dp.allm.core_client
    # 200 steps of 50 ms: a loaded machine's stalls (two pytest workers on 2 cores) do not see it finish. Its own
    # 60 s TTFT target: under the server's 150 ms a stall between its arrival and the core's next step had the
    # fake core shed it (an error event as its first line, nothing left on a core: a flake of the slow suite)
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "stream": True,
            "slo": {"ttft_ms": 60_000}}
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", fake_dp.v1 + "/completions", json=body) as r,
    ):
        assert r.status_code == 200
        # the iterator kept: a discarded one is closed at once, and closing it closes the connection, i.e. the
        # client left before the check below (the flake: the server's abort then raced the read of _core_of)
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("data: ") and '"text"' in first, first  # a token, not an error event
        (core,) = set(dp._core_of.values())
    deadline = time.monotonic() + 1.5  # well before its 10 s were done (1.0 s was missed once under load)
    while dp._core_of or dp._stats[core].num_running:  # the abort reached that core, which let it go
        assert time.monotonic() < deadline, "the request was not aborted on its core"
        time.sleep(0.02)


@pytest.mark.slow  # ~30 s: a server with two API processes and two cores starts, serves, drains and stops
def test_two_api_processes_over_two_cores_and_sigterm_stops_all(tmp_path):
    port, pid_file = free_port(), tmp_path / "pids.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshserve.bench.frontend_server",
            "--port",
            str(port),
            "--api-server-count",
            "2",
            "--data-parallel-size",
            "2",
            "--step-ms",
            "5",
            "--pid-file",
            str(pid_file),
        ],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if pid_file.exists() and httpx.get(base + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        pids = json.loads(pid_file.read_text())
        assert len(pids["cores"]) == 2 and len(pids["api"]) == 2
        body = {"model": "fake", "prompt": [5, 6, 7], "max_tokens": 8}
        for _ in range(8):  # a connection each: either API process, either core
            assert (
                httpx.post(base + "/v1/completions", json=body, timeout=60).json()["usage"][
                    "completion_tokens"
                ]
                == 8
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    deadline = time.monotonic() + 15
    while any(map(alive, pids["cores"] + pids["api"])):
        assert time.monotonic() < deadline, "a child outlived the server"
        time.sleep(0.2)


@pytest.mark.slow  # ~60 s: `meshserve serve -dp 2` starts two tiny-model cores and two API processes
def test_cli_serve_dp2_internal_answers_and_stops_cleanly(tiny_model_dir):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshserve.cli",
            "serve",
            tiny_model_dir("llama"),
            "-dp",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            "--max-model-len",
            "256",
            "--device",
            "cpu",
            "--drain-timeout",
            "5",
            "--disable-access-log",
            "--uvicorn-log-level",
            "warning",
        ],
        env={**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(base + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        spawned = started_by(proc.pid)
        children = spawned + process_children(proc.pid)  # (and the forkserver they come from)
        assert len(spawned) == 4  # two engine cores, two API processes (one per core by default)
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        texts = {
            httpx.post(base + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
            for _ in range(6)
        }
        assert len(texts) == 1  # greedy: the same tokens whichever core served it
        assert httpx.get(base + "/health", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    deadline = time.monotonic() + 15
    while any(map(alive, children)):
        assert time.monotonic() < deadline, "a child outlived the server"
        time.sleep(0.2)
