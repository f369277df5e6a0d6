"""`meshserve serve` start-up: the engine core process starts before the front end's imports (the two overlap),
and neither a failed load nor Ctrl-C during start-up leaves a core process behind."""

import multiprocessing
import socket

import pytest

from meshserve.bench.fake_core import fake_core_factory
from meshserve.config import EngineArgs
from meshserve.errors import ModelLoadError
from meshserve.serve import api_server
from meshserve.serve.api_server import HttpOptions, serve_one_process
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

    def interrupted_imports():  # what was running when the front end began importing; then a Ctrl-C
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
