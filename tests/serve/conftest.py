"""Live OpenAI-compatible servers on loopback, in a background thread, around tiny random models."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from meshserve.config import EngineArgs
from meshserve.distributed.launch import free_port  # noqa: F401  (re-exported to tests)
from meshserve.engine.async_engine import AsyncLLM
from meshserve.serve.config import ServeConfig
from meshserve.serve.middleware import ServerState
from meshserve.serve.openai_api import build_app

MODEL = "tiny"


@dataclass
class LiveServer:
    base_url: str
    allm: AsyncLLM
    app: object
    state: ServerState
    server: object
    thread: threading.Thread

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve_in_thread(app, port: int | None = None, **uvicorn_kwargs):
    """Run an ASGI app with uvicorn in a daemon thread on loopback; returns (base_url, server, thread)."""
    import uvicorn

    port = port or free_port()
    uvicorn_kwargs.setdefault("timeout_graceful_shutdown", 1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, **uvicorn_kwargs))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}", server, thread


def start_server(allm: AsyncLLM, config: ServeConfig) -> LiveServer:
    state = ServerState()
    app = build_app(allm, config, state)
    base_url, server, thread = serve_in_thread(app)
    return LiveServer(base_url, allm, app, state, server, thread)


def make_engine(model_dir: str, **kwargs) -> AsyncLLM:
    kwargs.setdefault("max_model_len", 512)
    return AsyncLLM.from_engine_args(EngineArgs(model=model_dir, **kwargs))


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    allm = make_engine(tiny_model_dir("llama"))
    yield allm
    allm.shutdown()


@pytest.fixture(scope="session")
def live(tiny_engine) -> LiveServer:
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL, "tiny-alias"],
                                                max_request_body_bytes=256 * 1024))
    yield srv
    srv.stop()


@pytest.fixture()
def http(live):
    with httpx.Client(base_url=live.base_url, timeout=60) as client:
        yield client


def wait_idle(allm: AsyncLLM, timeout: float = 5.0) -> dict:
    """Engine stats once no request is left (blocks freed), or the last stats at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        stats = allm.engine.stats()  # racy read from the test thread: fine for polling
        if (not allm.engine.requests and stats["kv_cache_usage"] == 0.0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


@contextlib.contextmanager
def adding_bos(tokenizer) -> Iterator:
    """tokenizer made to add a BOS (<|endoftext|>, id 0) when asked for special tokens, as Llama's does; put back
    on exit (it is a shared server's)."""
    from tokenizers.processors import TemplateProcessing

    backend = tokenizer.backend_tokenizer
    before = backend.post_processor
    backend.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    try:
        yield tokenizer
    finally:
        backend.post_processor = before
