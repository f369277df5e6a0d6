"""`meshserve router`'s bad input: one `meshserve: error:` line naming the flag, exit 2, before any worker
starts (a NaN interval, a malformed URL or a port in use used to fail later, inside uvicorn or a worker)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from meshserve.cli import main

OK = ["router", "--backend", "http://127.0.0.1:1", "--workers", "1"]


@pytest.mark.parametrize("flags,message", [
    (["--backend", "http://"], "backend 'http://' must be an http(s)://HOST[:PORT] URL"),
    (["--backend", "http://a:99999"], "backend 'http://a:99999'"),
    (["--backend", "http://a:8000/v1"], "give the server's root URL, without /v1"),
    (["--fallback", "ftp://f:1"], "backend 'ftp://f:1'"),
    (["--discover", "nohostport"], "--discover wants HOST:PORT, got 'nohostport'"),
    (["--discover", "svc:abc"], "--discover wants HOST:PORT, got 'svc:abc'"),
    (["--health-interval", "nan"], "--health-interval must be > 0, got nan"),
    (["--retry-budget", "nan"], "--retry-budget must be > 0, got nan"),
    (["--drain-timeout", "nan"], "--drain-timeout must be >= 0, got nan"),
    (["--retry-after", "-1"], "--retry-after must be >= 0, got -1"),
    (["--affinity-slack", "-1"], "--affinity-slack must be >= 0, got -1"),
    (["--max-attempts", "0"], "--max-attempts must be >= 1, got 0"),
    (["--fallback-model", "small"], "--fallback-model renames requests for the fallback pool: add --fallback URL"),
    (["--port", "-3"], "--port must be in [0, 65535], got -3"),
    # taken, then every probe failed, or one server counted as two replicas, or a flag that did nothing
    (["--backend", "http://a b:1"], "backend 'http://a b:1' must be an http(s)://HOST[:PORT] URL"),
    (["--discover", "svc:0"], "--discover 'svc:0': the port must be in 1-65535"),
    (["--backend", "http://127.0.0.1:1/"], "replica 'http://127.0.0.1:1/' is given twice"),
    (["--fallback", "http://127.0.0.1:1"], "replica 'http://127.0.0.1:1' is given twice"),
    (["--disagg-concurrent"], "--disagg-concurrent sends the decode leg beside a prefill leg: add --prefill URL"),
])
def test_bad_router_flags_are_one_line(flags, message, capsys):
    assert main([*OK, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshserve: error: ") and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_one_line_for_any_worker_count(workers):
    """One worker used to run uvicorn on host:port itself: a taken port was uvicorn's ERROR line and exit 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "meshserve.cli", "router", "--host", "127.0.0.1", "--port",
                            str(port), "--workers", workers, "--backend", "http://127.0.0.1:1"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == f"meshserve: error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_port_0_announces_the_port_it_got():
    """The start line used to say http://HOST:0, the flag's value, not the port the kernel gave."""
    p = subprocess.Popen([sys.executable, "-m", "meshserve.cli", "router", "--host", "127.0.0.1", "--port", "0",
                          "--workers", "1", "--backend", "http://127.0.0.1:1"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = p.stdout.readline()
    finally:
        p.terminate()
        p.wait(30)
    port = int(line.split("routing on http://127.0.0.1:")[1].split()[0])
    assert port > 0, line
