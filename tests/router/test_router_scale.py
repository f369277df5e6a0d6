"""The router under load: refusals pass through unchanged and at once, both upstream paths relay the same
bytes, and `--workers N` runs N router processes on one port."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import httpx
import pytest

import meshserve.router.app as router_app
from meshserve.cli import build_parser, main
from meshserve.router.config import RouterConfig
from meshserve.router.launcher import argv_from_namespace
from meshserve.router.upstream import FastUpstream, HttpxUpstream, httptools
from tests.router.conftest import free_port, wait_until
from tests.router.test_router_proxy import QUIET

UPSTREAMS = ["fast", "httpx"] if httptools is not None else ["httpx"]


@pytest.fixture(params=UPSTREAMS)
def upstream_kind(request, monkeypatch) -> str:
    """The router's upstream path: FastUpstream (httptools) or the plain httpx one."""
    if request.param == "httpx":
        monkeypatch.setattr(router_app, "make_upstream", lambda client, expiry: HttpxUpstream(client))
    else:
        monkeypatch.setattr(router_app, "make_upstream", lambda client, expiry: FastUpstream(expiry))
    return request.param


def test_a_replicas_429_comes_back_unchanged_and_at_once(fake_replicas, router, upstream_kind):
    scripts = [fake_replicas(f"full{i}", mode="status", status=429) for i in range(2)]
    r = router(RouterConfig(backends=[up.base_url for _, up in scripts], max_attempts=3, **QUIET))
    direct = httpx.post(scripts[0][1].base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    seconds = []
    with httpx.Client(base_url=r.base_url, timeout=10) as client:
        for _ in range(20):
            t0 = time.perf_counter()
            resp = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "stream": True})
            seconds.append(time.perf_counter() - t0)
            assert resp.status_code == 429
            assert resp.content == direct.content  # the replica's OpenAI error body, byte for byte
            assert resp.json()["error"]["code"] == 429 and resp.json()["error"]["message"] == "scripted 429"
            assert resp.headers["retry-after"] == "7" and resp.headers["content-type"] == "application/json"
            assert resp.headers["x-meshserve-attempts"] == "2"  # the other replica was asked, then refused
    # both fake replicas and the router share this process's GIL with the client: a bound against hangs and
    # queueing (the W3 router took 11.5 s), not a benchmark
    assert statistics.median(seconds) < 0.2, seconds
    replicas = httpx.get(r.base_url + "/router/replicas").json()["replicas"]
    assert all(replica["healthy"] for replica in replicas)  # a refusal ejects nobody


def test_both_upstream_paths_relay_streams_and_reuse_connections(fake_replicas, router, upstream_kind):
    script, up = fake_replicas("a", num_events=40)
    r = router(RouterConfig(backends=[up.base_url], **QUIET))
    with httpx.Client(base_url=r.base_url, timeout=10) as client:
        for i in range(5):
            with client.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": f"p{i}",
                                                               "stream": True}) as resp:
                assert resp.status_code == 200
                data = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
            assert data[-1] == "[DONE]" and len(data) == 41
            assert [json.loads(d)["choices"][0]["text"] for d in data[:-1]] == [f"a:{k} " for k in range(40)]
        plain = client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == "from a"
    assert [req["body"]["prompt"] for req in script.requests] == [f"p{i}" for i in range(5)] + ["x"]
    upstream = r.app.state.proxy.upstream
    if upstream_kind == "fast":  # one request at a time: one kept-alive connection served them all
        assert [len(idle) for idle in upstream._idle.values()] == [1]


def test_workers_flag_is_validated_and_kept_from_the_replicas(capsys):
    assert main(["router", "--backend", "http://127.0.0.1:1", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    ns = build_parser().parse_args(["serve", "/m", "-dp", "2", "--data-parallel-backend", "router",
                                    "--router-workers", "3"])
    assert ns.router_workers == 3 and "--router-workers" not in argv_from_namespace(ns.serve_parser, ns)


def test_two_router_workers_answer_on_one_port_and_drain_on_sigterm(fake_replicas):
    script, up = fake_replicas("a", num_events=3)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "meshserve.cli", "router", "--host", "127.0.0.1", "--port",
                             str(port), "--backend", up.base_url, "--workers", "2", "--disable-access-log"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    pids: set[int] = set()

    def seen_both() -> bool:
        try:  # a new connection each time: the kernel hands it to whichever worker accepts first
            snap = httpx.get(base + "/router/replicas", timeout=5).json()
        except httpx.HTTPError:
            return False
        if snap["replicas"][0]["healthy"]:
            pids.add(snap["worker_pid"])
        return len(pids) == 2

    try:
        assert wait_until(seen_both, 120, 0.02), f"workers seen: {pids}"
        assert proc.pid not in pids  # the parent only supervises
        for i in range(6):
            resp = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": f"w{i}"}, timeout=10)
            assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "from a"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        for pid in pids:  # every worker drained and exited
            assert wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), 10)
        with pytest.raises(httpx.HTTPError):
            httpx.get(base + "/health", timeout=1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


PIECES = [b'data: {"id": "s", "choices": [{"text": "a"',
          b'}]}\n\ndata: {"id": "s", "choices": [{"text": "b"}]}\n',
          b'\ndata: {"id": "s", "choices": [{"text": "c"}]}\n\n', b"data: [DONE]\n\n"]


def split_event_replica(pieces: list[bytes]):
    """A replica whose reads end mid-event (the pieces arrive apart): the router still sends whole events."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.get("/ready")
    async def ready():
        return {"status": "ready"}

    @app.post("/v1/completions")
    async def completions():
        async def gen():
            for piece in pieces:
                yield piece
                await asyncio.sleep(0.1)

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


@pytest.mark.parametrize("ends_with_done", [True, False])
def test_events_split_across_reads_are_relayed_whole(router, upstream_kind, ends_with_done):
    from tests.router.conftest import serve_in_thread

    pieces = PIECES if ends_with_done else PIECES[:-1]
    up = serve_in_thread(split_event_replica(pieces))
    try:
        r = router(RouterConfig(backends=[up.base_url], **QUIET))
        with httpx.stream("POST", r.base_url + "/v1/completions", json={"prompt": "x", "stream": True},
                          timeout=10) as resp:
            sends = list(resp.iter_raw())
    finally:
        up.stop()
    assert all(s.endswith(b"\n\n") for s in sends), sends  # never half an event
    body = b"".join(sends)
    if ends_with_done:
        assert body == b"".join(PIECES)
    else:  # no [DONE]: the stream broke, and says so once, at the end
        events = body.split(b"\n\n")[:-1]
        assert body.startswith(b"".join(PIECES[:-1])) and len(events) == 5
        assert json.loads(events[3][6:])["error"]["code"] == "upstream_stream_broken"
        assert events[4] == b"data: [DONE]"
