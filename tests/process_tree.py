"""The processes a meshserve command started, read from /proc, whichever start method it used (process_start.py):
spawned children are its own, forkserver children are its server's."""

from __future__ import annotations

from meshserve.engine.core_process import pid_alive as alive  # noqa: F401 (the tests' name for it)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def started_by(pid: int) -> list[int]:
    """The multiprocessing children pid started (ranks, cores, API processes), not its helpers (the forkserver,
    the resource tracker)."""
    started = []
    for c in children(pid):
        cmd = cmdline(c)
        if "spawn_main" in cmd:
            started.append(c)
        elif "multiprocessing.forkserver" in cmd:
            started.extend(children(c))
    return started

