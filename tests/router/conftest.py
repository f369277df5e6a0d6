"""Router test helpers: scripted fake replicas and routers in threads, real replicas as subprocesses.

Everything binds to 127.0.0.1. Every thread and process started here is stopped by the fixture that
started it, also when a test fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from meshserve.distributed.launch import free_port
from meshserve.router.app import build_router_app
from meshserve.router.config import RouterConfig
from tests.router.loadgen import FIGURES
from tests.waiting import wait_until  # noqa: F401 (the router tests import it from here)


def metric_value(url: str, name: str) -> float:
    """The sum of the Prometheus samples named exactly `name` (labels included) at url's /metrics."""
    text = httpx.get(url + "/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE))
from tests.serve.conftest import serve_in_thread as run_uvicorn_in_thread


# -- uvicorn in a thread -------------------------------------------------------------------------------
@dataclass
class ThreadServer:
    base_url: str
    app: object
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        stop_all([self])


def stop_all(servers: list[ThreadServer]) -> None:
    """Ask every server to exit, then wait for each: their graceful shutdowns (up to ~1 s each) overlap."""
    for srv in servers:
        srv.server.should_exit = True
    for srv in servers:
        srv.thread.join(10)


def serve_in_thread(app, port: int | None = None) -> ThreadServer:
    # a fake replica left hanging (mode "hang") would hold its graceful shutdown for the whole grace: these
    # servers' own drain is not under test here, so a short one
    base_url, server, thread = run_uvicorn_in_thread(app, port, timeout_keep_alive=5,
                                                     timeout_graceful_shutdown=0.2)
    return ThreadServer(base_url, app, server, thread)


# -- scripted fake replicas ----------------------------------------------------------------------------
@dataclass
class Script:
    """What a fake replica does. `mode`: ok | status | die_midstream | hang | die_before_first."""

    name: str
    mode: str = "ok"
    status: int = 200
    ready_status: int = 200
    num_events: int = 5
    event_delay_s: float = 0.0
    hang_s: float = 30.0
    answer_delay_s: float = 0.0  # before a non-streamed answer
    first_event_delay_s: float = 0.0  # before a stream's first event
    # set: streams go on past their first event only while it is set (a test holds them in flight as long as its
    # checks take, then lets them finish at once), each stream for at most hang_s
    hold: threading.Event | None = None
    requests: list[dict] = field(default_factory=list)  # headers + body of each generation request


def fake_replica_app(script: Script) -> FastAPI:
    app = FastAPI()

    @app.get("/ready")
    async def ready():
        if script.mode == "hang":
            await asyncio.sleep(script.hang_s)
        return JSONResponse({"status": "ready"}, status_code=script.ready_status)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        from starlette.responses import PlainTextResponse

        return PlainTextResponse('vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n')

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "tiny", "object": "model", "owned_by": script.name}]}

    async def generate(request: Request):
        body = await request.json()
        script.requests.append({"headers": dict(request.headers), "body": body})
        if script.mode == "hang":
            await asyncio.sleep(script.hang_s)
        if script.mode == "status":
            return JSONResponse({"error": {"message": f"scripted {script.status}", "type": "x", "param": None,
                                           "code": script.status}},
                                status_code=script.status, headers={"Retry-After": "7"})
        if not body.get("stream"):
            await asyncio.sleep(script.answer_delay_s)
            return {"id": "x", "object": "text_completion", "model": body.get("model"),
                    "choices": [{"index": 0, "text": f"from {script.name}", "finish_reason": "stop"}]}

        async def events():
            if script.mode == "die_before_first":
                raise RuntimeError("scripted death before the first event")
            for i in range(script.num_events):
                await asyncio.sleep(script.event_delay_s if i else script.first_event_delay_s)
                if i == 1 and script.hold is not None:
                    deadline = time.monotonic() + script.hang_s
                    while not script.hold.is_set() and time.monotonic() < deadline:
                        await asyncio.sleep(0.01)
                chunk = {"choices": [{"index": 0, "text": f"{script.name}:{i} ", "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
                if script.mode == "die_midstream" and i == 1:
                    raise RuntimeError("scripted death mid-stream")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app.add_api_route("/v1/completions", generate, methods=["POST"])
    app.add_api_route("/v1/chat/completions", generate, methods=["POST"])
    return app


@pytest.fixture()
def fake_replicas() -> Iterator[Callable[..., tuple[Script, ThreadServer]]]:
    started: list[ThreadServer] = []

    def make(name: str, **kwargs) -> tuple[Script, ThreadServer]:
        script = Script(name, **kwargs)
        srv = serve_in_thread(fake_replica_app(script))
        started.append(srv)
        return script, srv

    yield make
    stop_all(started)


@pytest.fixture()
def router() -> Iterator[Callable[..., ThreadServer]]:
    """Factory: a router app over the given config, served in a thread (its health loop running)."""
    started: list[ThreadServer] = []

    def make(config: RouterConfig) -> ThreadServer:
        srv = serve_in_thread(build_router_app(config))
        started.append(srv)
        return srv

    yield make
    stop_all(started)


# -- real replicas as subprocesses ---------------------------------------------------------------------
class ServerProcess:
    """`python -m meshserve.cli ARGS` on a fixed loopback port; killable and restartable."""

    def __init__(self, name: str, args: list[str], port: int, log_dir: str):
        self.name = name
        self.args = args
        self.port = port
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        log = open(self.log_path, "a")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen([sys.executable, "-m", "meshserve.cli", *self.args],
                                     stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited early:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} never became ready:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process must be able to die
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(30)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


@pytest.fixture(scope="module")
def processes(tmp_path_factory) -> Iterator[Callable[[str, list[str], int | None], ServerProcess]]:
    """Factory of ServerProcess; all of them are killed when the module ends."""
    log_dir = str(tmp_path_factory.mktemp("router-logs"))
    started: list[ServerProcess] = []

    def make(name: str, args: list[str], port: int | None = None) -> ServerProcess:
        p = ServerProcess(name, args, port or free_port(), log_dir)
        started.append(p)
        return p

    yield make
    for p in started:
        p.kill()


def replica_args(model_dir: str, port: int, served: list[str], extra: list[str] = ()) -> list[str]:
    # the engine in the server's thread: one process (one torch import) per replica, not two. The router sees
    # the same HTTP replica either way; a SIGKILL or SIGSTOP of it still takes the whole replica out
    return ["serve", model_dir, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", *served,
            "--max-model-len", "256", "--device", "cpu", "--disable-access-log", "--uvicorn-log-level",
            "warning", "--drain-timeout", "2", "--engine-in-thread", *extra]


def pytest_terminal_summary(terminalreporter) -> None:
    if not FIGURES:
        return
    terminalreporter.write_sep("=", "router fault-injection figures")
    cols = ["sent", "succeeded", "retried", "fallback", "failed_cleanly", "lost", "seconds"]
    terminalreporter.write_line(f"{'scenario':<36}" + "".join(f"{c:>15}" for c in cols))
    for scenario, fig in FIGURES.items():
        terminalreporter.write_line(f"{scenario:<36}" + "".join(f"{fig.get(c, '-')!s:>15}" for c in cols))
        extra = {k: v for k, v in fig.items() if k not in cols}
        if extra:
            terminalreporter.write_line(f"{'':<36}" + ", ".join(f"{k}: {v}" for k, v in extra.items()))
