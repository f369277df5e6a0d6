"""process_start: a child gets the parent's environment as of its start (not the forkserver's), the parent's
stdout, dies with the parent, and starts from a server that never initialised CUDA; 'spawn' still works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshserve.distributed import process_start
from tests.process_tree import alive

METHODS = ["forkserver", "spawn"] if sys.platform.startswith("linux") else ["spawn"]
forkserver_only = pytest.mark.skipif("forkserver" not in METHODS, reason="forkserver: Linux only here")


def _report(conn, keys) -> None:
    """What a child sees before it imports anything itself (torch only where the server preloaded it)."""
    modules = sorted(sys.modules)
    seen = {"env": {k: os.environ.get(k) for k in keys}, "modules": modules}
    if "torch" in modules:
        import torch

        seen.update(cuda_initialized=torch.cuda.is_initialized(), threads=torch.get_num_threads())
    conn.send(seen)
    conn.close()


def _run(keys, env=None) -> dict:
    ctx = process_start.context()
    recv, send = ctx.Pipe(duplex=False)
    p = process_start.new_process(_report, (send, keys), env=env)
    p.start()
    send.close()
    seen = recv.recv()
    p.join(30)
    assert p.exitcode == 0
    return seen


@pytest.mark.parametrize("method", METHODS)
def test_child_gets_the_parents_environment_at_start_with_overrides(method, monkeypatch):
    monkeypatch.setenv(process_start.ENV, method)
    monkeypatch.setenv("MESHSERVE_PROBE_GONE", "set before the server started")
    monkeypatch.delenv("MESHSERVE_PROBE_LATE", raising=False)
    keys = ["MESHSERVE_PROBE_LATE", "MESHSERVE_PROBE_GONE", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"]
    first = _run(keys)  # (with forkserver: now running, with this environment)
    assert first["env"]["MESHSERVE_PROBE_LATE"] is None
    monkeypatch.setenv("MESHSERVE_PROBE_LATE", "set after")
    monkeypatch.delenv("MESHSERVE_PROBE_GONE")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    later = _run(keys, env={"CUDA_VISIBLE_DEVICES": "1"})
    assert later["env"] == {"MESHSERVE_PROBE_LATE": "set after", "MESHSERVE_PROBE_GONE": None,
                            "CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "1"}
    if method == "forkserver":  # torch was imported by the server: its thread count follows the new setting
        assert later["threads"] == 1
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # the override is the child's alone


@forkserver_only
def test_forkserver_preloads_torch_without_cuda_or_meshserve(monkeypatch):
    monkeypatch.setenv(process_start.ENV, "spawn")
    spawned = _run([])
    monkeypatch.setenv(process_start.ENV, "forkserver")
    forked = _run([])
    preloaded = set(forked["modules"]) - set(spawned["modules"])  # what the server imported before forking
    assert {"torch", "torch.distributed", "numpy"} <= preloaded
    assert not [m for m in preloaded if m.split(".")[0] in ("meshserve", "transformers", "huggingface_hub")]
    assert forked["cuda_initialized"] is False


def _print_line(text: str) -> None:
    print(text, flush=True)


@forkserver_only  # (a spawned child inherits fds 1 and 2 as it starts)
def test_child_writes_to_the_parents_current_stdout(monkeypatch, tmp_path):
    monkeypatch.setenv(process_start.ENV, "forkserver")
    _run([])  # the server (if any) starts with the stdout of now
    out = tmp_path / "out.txt"
    saved = os.dup(1)
    try:
        with open(out, "w") as f:
            os.dup2(f.fileno(), 1)
            p = process_start.new_process(_print_line, ("hello from the child",))
            p.start()
            p.join(30)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert p.exitcode == 0
    assert out.read_text() == "hello from the child\n"


_ORPHAN_PARENT = """
import sys, time
sys.path.insert(0, {here!r})
from meshserve.distributed import process_start
from test_process_start import _sleep_with_parent
process_start.PRELOAD = ()  # the mechanism, not torch's import time
p = process_start.new_process(_sleep_with_parent)
p.start()
time.sleep(60)
"""


def _sleep_with_parent() -> None:
    from meshserve.distributed.launch import die_with_parent

    die_with_parent()
    print(os.getpid(), flush=True)  # armed (on the parent's stdout, a pipe to the test)
    time.sleep(60)


@forkserver_only  # (a spawned child's parent is the one that died)
def test_child_dies_with_its_parent():
    """A forkserver child's real parent is the server, which outlives the parent while any child holds the
    server's alive pipe: the child must let go of it, or die_with_parent() would never fire."""
    script = _ORPHAN_PARENT.format(here=os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, process_start.ENV: "forkserver", 
                                   "PYTHONPATH": str(Path(process_start.__file__).parents[2])})
    try:
        child = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while alive(child):
            if time.monotonic() > deadline:
                os.kill(child, signal.SIGKILL)
                pytest.fail("the child outlived its killed parent")
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()


def test_unknown_start_method_is_refused(monkeypatch):
    monkeypatch.setenv(process_start.ENV, "fork")
    with pytest.raises(ValueError, match=process_start.ENV):
        process_start.start_method()


@pytest.mark.gpu
@forkserver_only
def test_forkserver_child_uses_cuda_after_the_parent_did(monkeypatch):
    """A forkserver whose preload had initialised CUDA would hand every child a dead CUDA context."""
    import torch

    monkeypatch.setenv(process_start.ENV, "forkserver")
    torch.zeros(1, device="cuda")  # the parent's CUDA is up; the server's must not be
    ctx = process_start.context()
    recv, send = ctx.Pipe(duplex=False)
    env = {"CUDA_VISIBLE_DEVICES": "1"} if torch.cuda.device_count() >= 2 else None
    p = process_start.new_process(_cuda_in_child, (send,), env=env)
    p.start()
    send.close()
    initialized_before, count, uuid, total = recv.recv()
    p.join(60)
    assert p.exitcode == 0 and initialized_before is False and total == 3.0
    if env is not None:  # it sees one device, the parent's device 1
        assert count == 1 and uuid == str(torch.cuda.get_device_properties(1).uuid)


def _cuda_in_child(conn) -> None:
    import torch

    initialized_before = torch.cuda.is_initialized()
    total = float(torch.ones(3, device="cuda").sum())
    conn.send((initialized_before, torch.cuda.device_count(), str(torch.cuda.get_device_properties(0).uuid), total))

_CUDA_PROBE = """
import sys, torch
calls = []
def wrap(owner, name):
    fn = getattr(owner, name)
    def recorded(*a, **k):
        calls.append(name)
        return fn(*a, **k)
    setattr(owner, name, recorded)
for name in ("is_available", "device_count", "init", "_lazy_init", "current_device", "get_device_capability",
             "get_device_properties", "is_bf16_supported"):
    wrap(torch.cuda, name)
for name in [n for n in dir(torch._C) if n.startswith("_cuda_")]:
    wrap(torch._C, name)
from meshserve.distributed.process_start import PRELOAD
for module in PRELOAD:
    __import__(module)
print(calls)
"""


@pytest.mark.slow  # a fresh interpreter importing the preload (~4 s); GPU machines: the gpu test below
def test_preloaded_modules_do_not_touch_cuda_at_import():
    out = subprocess.run([sys.executable, "-c", _CUDA_PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(process_start.__file__).parents[2])})
    assert out.stdout.strip() == "[]"


def _report_sigterm(conn) -> None:
    conn.send(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)
    conn.close()


def _child_ignores_sigterm() -> bool:
    ctx = process_start.context()
    recv, send = ctx.Pipe(duplex=False)
    p = process_start.new_process(_report_sigterm, (send,))
    p.start()
    send.close()
    ignored = recv.recv()
    p.join(30)
    return ignored


@pytest.mark.parametrize("method", METHODS)
def test_child_gets_the_parents_sigterm_disposition_not_the_forkservers(method, monkeypatch):
    """The forkserver ignores SIGTERM (a signal to the process group must not kill it and its children); a child
    ignores it only where its parent does (the engine core's ranks), as a spawned child would."""
    monkeypatch.setenv(process_start.ENV, method)
    assert _child_ignores_sigterm() is False
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert _child_ignores_sigterm() is True
    finally:
        signal.signal(signal.SIGTERM, previous)


@forkserver_only
def test_the_forkserver_ignores_sigterm(monkeypatch):
    from multiprocessing import forkserver

    monkeypatch.setenv(process_start.ENV, "forkserver")
    process_start.warm_up()
    pid = forkserver._forkserver._forkserver_pid
    ignored = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("SigIgn:")).split()[1], 16)
    assert ignored & (1 << (signal.SIGTERM - 1))
