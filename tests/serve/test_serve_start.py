"""`meshserve serve` start-up: the engine core process starts before the front end's imports (the two overlap),
API processes start while it loads, neither a failed load nor Ctrl-C during start-up leaves a process behind,
and the start-up timeline (engine/startup_timeline.py) is logged once, with every process's phases."""

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from meshserve.bench.fake_core import fake_core_factory
from meshserve.config import EngineArgs
from meshserve.errors import ModelLoadError
from meshserve.serve import api_server
from meshserve.serve.api_server import HttpOptions, serve_api_processes, serve_one_process
from meshserve.serve.config import ServeConfig

CONFIG = ServeConfig(served_model_names=["tiny"])


def _new_children(before: set[int]) -> list:
    return [p for p in multiprocessing.active_children() if p.pid not in before]


def _sock() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def test_the_core_starts_before_the_front_end_imports_and_ctrl_c_then_stops_it(monkeypatch):
    before = {p.pid for p in multiprocessing.active_children()}
    seen: list[str] = []

    def interrupted_imports(engine_args):  # what was running when the front end began importing; then a Ctrl-C
        seen.extend(p.name for p in _new_children(before))
        raise KeyboardInterrupt

    monkeypatch.setattr(api_server, "_import_front_end", interrupted_imports)
    sock = _sock()
    with pytest.raises(KeyboardInterrupt):
        serve_one_process(EngineArgs(device="cpu", max_model_len=256), CONFIG, sock, HttpOptions(port=0),
                          core_factory=fake_core_factory(0.001))
    sock.close()
    assert seen == ["meshserve-engine-core"]
    assert not _new_children(before)  # killed while it loaded: nothing outlives the interrupted start


def test_a_failed_load_reaches_the_caller_and_leaves_no_process(tmp_path):
    before = {p.pid for p in multiprocessing.active_children()}
    sock = _sock()
    with pytest.raises(ModelLoadError, match="not found"):
        serve_one_process(EngineArgs(model=str(tmp_path / "nope")), CONFIG, sock, HttpOptions(port=0))
    sock.close()
    assert not _new_children(before)


def _serve_until_the_timeline(serve, caplog, sock: socket.socket, scraped: list | None = None) -> str:
    """Run serve() here (the main thread: its signal handlers) until it logs the start-up timeline, then
    SIGTERM it (a drain, nothing in flight); the line. scraped: gets /metrics' meshserve:startup_seconds."""
    lines: list[str] = []

    def watch():
        deadline = time.monotonic() + 240
        while not lines and time.monotonic() < deadline:
            lines.extend(r.getMessage() for r in list(caplog.records) if r.getMessage().startswith("start-up"))
            time.sleep(0.1)
        if scraped is not None and lines:
            text = httpx.get(f"http://127.0.0.1:{sock.getsockname()[1]}/metrics", timeout=30).text
            scraped.extend(float(x.split()[1]) for x in text.splitlines() if x.startswith("meshserve:startup_seconds"))
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=watch, daemon=True)
    with caplog.at_level(logging.INFO, logger="meshserve"):
        watcher.start()
        assert serve() == 0
    watcher.join()
    assert len(lines) == 1, "no start-up timeline was logged"
    return lines[0]


def _phases(line: str, label: str) -> list[str]:
    part = next(p for p in line.split(": ", 1)[1].split(" | ") if p.startswith(label + " "))
    return [p.rsplit(" ", 1)[0].split(" (Triton")[0] for p in part.split("]: ", 1)[1].split(" -> ")[0].split(", ")]


def test_one_api_process_logs_its_and_the_core_s_phases_once_listening(tiny_model_dir, caplog):
    before = {p.pid for p in multiprocessing.active_children()}
    sock = _sock()
    args = EngineArgs(model=tiny_model_dir("llama"), max_model_len=64)
    scraped: list[float] = []
    line = _serve_until_the_timeline(lambda: serve_one_process(args, CONFIG, sock, HttpOptions(port=0)), caplog,
                                     sock, scraped)
    assert _phases(line, "api") == ["core spawned", "imports", "waiting for the core", "tokenizer + core client",
                                    "app built", "listening"]
    core = _phases(line, "core")
    assert core[:3] == ["imports", "config", "model built"] and "weights" in core and "KV allocated" in core
    ready_in = float(line.rsplit("ready in ", 1)[1].split(" s)")[0])
    assert len(scraped) == 1 and scraped[0] == pytest.approx(ready_in, abs=0.15)  # the gauge: the same total
    assert not _new_children(before)


@pytest.mark.slow  # ~15-27 s on 2 busy cores: three processes import torch or the front end
def test_api_processes_start_while_the_core_loads_and_one_line_holds_every_process(tiny_model_dir, caplog):
    before = {p.pid for p in multiprocessing.active_children()}
    sock = _sock()
    args = EngineArgs(model=tiny_model_dir("llama"), max_model_len=64)
    line = _serve_until_the_timeline(lambda: serve_api_processes(args, CONFIG, sock, HttpOptions(port=0), 2),
                                     caplog, sock)
    assert _phases(line, "cli") == ["core spawned", "API processes spawned", "waiting for the core"]
    assert "weights" in _phases(line, "core")
    for label in ("api-0", "api-1"):  # each imported and loaded its tokenizer while the core loaded
        assert _phases(line, label) == ["imports", "waiting for the core", "tokenizer", "app built", "listening"]
    assert not _new_children(before)


def test_a_failed_load_with_api_processes_ends_them_all_with_its_error(tmp_path):
    before = {p.pid for p in multiprocessing.active_children()}
    sock = _sock()
    with pytest.raises(ModelLoadError, match="not found"):
        serve_api_processes(EngineArgs(model=str(tmp_path / "nope")), CONFIG, sock, HttpOptions(port=0), 2)
    assert not _new_children(before)
