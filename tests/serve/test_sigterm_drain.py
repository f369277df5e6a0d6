"""`meshserve serve` in a subprocess: SIGTERM drains in-flight requests, refuses new ones, exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.serve.conftest import free_port


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server never became ready")


def _wait_for_requests(base: str, n: int, timeout: float = 60) -> None:
    """Until the engine holds n requests (running + waiting), from /metrics: on a loaded machine a client
    thread can take long to reach the server, and one that arrives after SIGTERM is refused (503)."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(base + "/metrics", timeout=5).text
        held = sum(float(line.split()[1]) for line in text.splitlines()
                   if line.startswith(("meshserve:num_requests_running ", "meshserve:num_requests_waiting ")))
        if held >= n:
            return
        assert time.monotonic() < deadline, f"{held} of {n} requests reached the engine"
        time.sleep(0.05)


def test_sigterm_drains_in_flight_requests(tiny_model_dir):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshserve.cli", "serve", tiny_model_dir("llama"), "--host", "127.0.0.1",
         "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "512", "--max-num-seqs", "1",
         "--drain-timeout", "60", "--disable-access-log", "--uvicorn-log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_ready(base, proc)
        results: dict[int, dict] = {}
        first_chunk = threading.Event()

        def stream(i: int) -> None:
            body = {"model": "tiny", "prompt": f"Story {i}", "max_tokens": max_tokens[i], "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as resp:
                text, usage, finish = "", None, None
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    first_chunk.set()
                    for c in chunk["choices"]:
                        text += c["text"]
                        finish = c["finish_reason"] or finish
                    usage = chunk.get("usage") or usage
                results[i] = {"status": resp.status_code, "usage": usage, "finish": finish}

        # the first runs long (the window in which the others must reach the server, as one request runs at a
        # time); the three queued behind it need fewer tokens, enough that the drain outlasts the checks below
        max_tokens = [450, 150, 150, 150]
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        threads[0].start()
        assert first_chunk.wait(30)  # the long one is running: the others queue behind it
        for t in threads[1:]:
            t.start()
        _wait_for_requests(base, 4)  # the other three queue behind max-num-seqs 1: all must be in first
        proc.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + 10
        while httpx.get(base + "/ready", timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=5)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert httpx.get(base + "/health", timeout=5).status_code == 200

        for t in threads:
            t.join(120)
        assert proc.wait(60) == 0
        assert sorted(results) == [0, 1, 2, 3]
        for i, r in results.items():  # nothing in flight was lost
            assert r["status"] == 200 and r["finish"] == "length"
            assert r["usage"]["completion_tokens"] == max_tokens[i]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_drain_timeout_ends_requests_in_band(tiny_model_dir):
    """Requests still in flight when --drain-timeout passes end in-band, as the streaming contract says: a
    stream with its error event (server_draining) and [DONE], one whose headers had not gone out with a 503
    and Retry-After. They used to run on for uvicorn's 2 s of grace and then lose their connection mid-body
    (no [DONE]; the queued ones a bare 500)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshserve.cli", "serve", tiny_model_dir("llama"), "--host", "127.0.0.1",
         "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "512", "--max-num-seqs", "1",
         "--drain-timeout", "0.2", "--disable-access-log", "--uvicorn-log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        _wait_ready(base, proc)
        results: dict[int, dict] = {}

        def stream(i: int) -> None:
            body = {"model": "tiny", "prompt": f"Story {i}", "max_tokens": 450, "ignore_eos": True,
                    "stream": True}
            events = []
            try:
                with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as resp:
                    if resp.status_code != 200:
                        results[i] = {"status": resp.status_code, "headers": resp.headers,
                                      "body": resp.read()}
                        return
                    events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
            except httpx.HTTPError as e:  # a connection cut mid-body
                results[i] = {"status": 200, "broken": repr(e)}
                return
            results[i] = {"status": 200, "events": events}

        # one runs at a time (max-num-seqs 1): 8 x 450 tokens outlast the drain and uvicorn's grace after it
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        _wait_for_requests(base, 8)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0
        assert sorted(results) == list(range(8))
        ended = 0
        for r in results.values():
            assert "broken" not in r, r
            if r["status"] == 503:  # still queued: its headers had not gone out
                assert "retry-after" in r["headers"]
                assert json.loads(r["body"])["error"]["code"] == "server_draining"
                ended += 1
                continue
            assert r["status"] == 200 and r["events"][-1] == "[DONE]"
            last = json.loads(r["events"][-2])
            if "error" in last:
                assert last["error"]["code"] == "server_draining"
                ended += 1
            else:
                assert last["choices"][0]["finish_reason"] == "length"
        assert ended > 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
            while httpx.get(base + "/ready", timeout=5).status_code != 503:  # the drain has begun
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
