"""`meshserve serve` as the leader of its own process group: SIGTERM to the whole group drains and leaks nothing
(the forkserver, the engine core and the TP ranks get it too), a second signal ends the drain at once and
quietly. The plain drain (SIGTERM to the server alone, the drain timeout): test_sigterm_drain.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.serve.conftest import free_port
from tests.serve.test_sigterm_drain import _wait_ready


def _start_in_own_group(model: str, port: int, *extra: str) -> subprocess.Popen:
    """`meshserve serve` as the leader of its own process group, as under `timeout`, a service manager or a
    terminal: a signal to the group reaches the forkserver, the engine core and the resource tracker too."""
    return subprocess.Popen(
        [sys.executable, "-m", "meshserve.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "tiny", "--max-model-len", "512", "--disable-access-log",
         "--uvicorn-log-level", "warning", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        start_new_session=True)


def _stream_until_first_chunk(base: str, results: list) -> threading.Thread:
    first = threading.Event()

    def stream() -> None:
        body = {"model": "tiny", "prompt": "Story", "max_tokens": 450, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    first.set()
                    if line:
                        results.append(line)
        except httpx.HTTPError as e:
            results.append(repr(e))
        first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(30)
    return t


def _ready_status(base: str) -> int | None:
    """/ready's status; None when the probe's connection was reset (seen once in CI on a loaded 2-core box, at
    the signal: 2026-12-05, not reproduced in five runs; the checks that follow still hold the server to a
    quiet, prompt exit and an in-band end of the stream)."""
    try:
        return httpx.get(base + "/ready", timeout=5).status_code
    except httpx.TransportError:
        return None


def test_sigterm_to_the_process_group_drains_and_leaks_nothing(tiny_model_dir):
    """The forkserver ignores SIGTERM: a SIGTERM to the whole group used to kill it and so (PR_SET_PDEATHSIG)
    the engine core mid-drain, whose semaphore (tqdm's lock) the resource tracker then reported as leaked."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start_in_own_group(tiny_model_dir("llama"), port)
    try:
        _wait_ready(base, proc)
        lines: list = []
        t = _stream_until_first_chunk(base, lines)
        os.killpg(proc.pid, signal.SIGTERM)
        t.join(60)
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in lines[-2].replace(" ", ""), lines[-2:]
        assert "leaked" not in err and "Traceback" not in err and "engine process is gone" not in err, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()



def test_second_signal_ends_the_drain_at_once_and_quietly(tiny_model_dir):
    """A second SIGTERM / Ctrl-C ends what is in flight in-band and exits, with one line saying so (uvicorn's
    forced exit printed the lifespan's and each request's CancelledError traceback)."""
    # (with API processes the parent passes the second signal on; they are not in its process group)
    cut_in_flight = 0
    for second, api_processes in ((signal.SIGTERM, "1"), (signal.SIGINT, "1"), (signal.SIGTERM, "2")):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = _start_in_own_group(tiny_model_dir("llama"), port, "--drain-timeout", "60",
                                   "--api-server-count", api_processes)
        try:
            _wait_ready(base, proc)
            lines: list = []
            t = _stream_until_first_chunk(base, lines)
            os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _ready_status(base) != 503:  # the drain has begun
                assert time.monotonic() < deadline
                time.sleep(0.01)
            # the stream (~450 steps) is still running, unless this machine was fast enough to end it already:
            # then there is nothing in flight to cut, and only the quiet, prompt exit is checked
            in_flight = "data: [DONE]" not in lines
            os.killpg(proc.pid, second)
            started = time.monotonic()
            assert proc.wait(30) == 0
            assert time.monotonic() - started < 10
            t.join(30)
            err = proc.stderr.read()
            assert "Traceback" not in err and "leaked" not in err, err
            assert f"second {second.name}: stopping without finishing the drain" in err
            if in_flight and "server_draining" in lines[-2]:
                cut_in_flight += 1
            assert lines[-1] == "data: [DONE]", lines[-2:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert cut_in_flight >= 1  # at least one stream was cut in-band by the second signal


def test_sigterm_with_tensor_parallel_ranks_leaks_nothing(tiny_model_dir):
    """A rank leaves with os._exit (fast), which skipped multiprocessing's finalizers: the semaphore of tqdm's
    lock (made as the rank loaded its weights) was reported as leaked at every shutdown of `serve -tp 2`."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start_in_own_group(tiny_model_dir("llama"), port, "-tp", "2")
    try:
        _wait_ready(base, proc)
        resp = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3},
                          timeout=60)
        assert resp.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert "leaked" not in err and "Traceback" not in err and "ERROR" not in err, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
