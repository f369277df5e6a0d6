"""A `meshserve serve` subprocess for benchmarks that compare server configurations one after the other:
start it (its output to a log), wait until /ready, read its /metrics counters, stop it (SIGTERM, then KILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx


def start_server(model: str, port: int, args: list[str], log: str, env: dict[str, str] | None = None,
                 ) -> subprocess.Popen:
    """`meshserve serve model` on 127.0.0.1:port, served as "bench", with `args` added; output to `log`."""
    cmd = [sys.executable, "-m", "meshserve.cli", "serve", model, "--port", str(port), "--host", "127.0.0.1",
           "--served-model-name", "bench", "--disable-access-log", *args]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, procs: list[subprocess.Popen], timeout: float = 900) -> None:
    """Until url's /ready answers 200; SystemExit when a process exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a server exited while starting (see the logs); waiting for {url}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout:.0f} s")


def stop(procs: list[subprocess.Popen], grace_s: float = 60) -> None:
    """SIGTERM each process group, then SIGKILL those still alive after grace_s."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def scrape(url: str) -> dict[str, float]:
    """Every sample of url's /metrics: 'name{label="v",...}' (labels sorted) or 'name' -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples
