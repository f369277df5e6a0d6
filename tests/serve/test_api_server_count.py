"""--api-server-count 2: two API processes share one engine core and one port; nothing outlives the server."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from meshserve.distributed.launch import free_port
from tests.process_tree import alive


def _start(tmp_path, count: int = 2):
    port, pid_file = free_port(), tmp_path / "pids.json"
    proc = subprocess.Popen([sys.executable, "-m", "meshserve.bench.frontend_server", "--port", str(port),
                             "--api-server-count", str(count), "--step-ms", "5", "--pid-file", str(pid_file)],
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    while True:  # the parent listens from the start; wait until an API process answers
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)
    pids = json.loads(pid_file.read_text())
    return proc, f"http://127.0.0.1:{port}", [pids["core"], *pids["api"]]


def _stream(base: str, i: int) -> int:
    body = {"model": "fake", "prompt": [5 + i, 6, 7], "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}
    # a connection each: the kernel hands them to either process
    with httpx.Client(timeout=60) as http, http.stream("POST", base + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    return json.loads(events[-2][6:])["usage"]["completion_tokens"]


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(map(alive, pids)):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


@pytest.mark.slow  # ~40 s on 2 busy cores: three processes start, drain and stop
def test_requests_through_two_api_processes_complete_and_sigterm_stops_all(tmp_path):
    proc, base, pids = _start(tmp_path)
    try:
        assert len(pids) == 3 and all(map(alive, pids))
        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(lambda i: _stream(base, i), range(32))) == [8] * 32
        # request series are summed over both processes, whichever answers the scrape
        for _ in range(4):
            metrics = httpx.get(base + "/metrics", timeout=10).text
            assert 'meshserve:requests_total{outcome="length"} 32.0' in metrics
            assert 'vllm:generation_tokens_total{engine="0",model_name="fake"} 256.0' in metrics
            # the admission margin is each process's own: one series per pid, both still at the start value
            margins = [line for line in metrics.splitlines() if line.startswith("meshserve:admission_margin{")]
            assert sorted(line.split('pid="')[1].split('"')[0] for line in margins) == sorted(map(str, pids[1:]))
            assert all(line.endswith(" 0.8") for line in margins)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert _wait_gone(pids, 15) == []


@pytest.mark.slow
def test_killing_the_server_leaves_no_orphans(tmp_path):
    proc, base, pids = _start(tmp_path)
    assert _stream(base, 0) == 8
    proc.kill()  # no chance to clean up: the children die with it (PR_SET_PDEATHSIG)
    proc.wait(10)
    assert _wait_gone(pids, 20) == []
