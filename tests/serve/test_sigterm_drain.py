"""`meshserve serve` in a subprocess: SIGTERM drains in-flight requests, refuses new ones, exits 0.

Signals to the server's whole process group (the forkserver, the core, the ranks), a second signal and
`serve -tp 2`'s shutdown: test_sigterm_process_group.py (two files, so that these server starts are not one
file's serial run at the end of `-n 2 --dist loadfile`)."""

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
                   if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")))
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
