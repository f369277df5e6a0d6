"""How meshserve starts its torch processes (ranks, the engine core, API processes): one multiprocessing start
method for all of them, and each child's environment handed over explicitly. (Router workers import no torch:
they stay spawned, since a server importing torch would only delay them.)

'spawn' starts a fresh interpreter that imports torch again: 3.6-3.8 s of a 2-core machine for every rank, core
and API process. On Linux the default is 'forkserver' with torch (and a few pure-Python modules) preloaded in the
server: a child is a fork of it and starts in well under a second. MESHSERVE_MP_START=spawn selects the plain path
(the default elsewhere).

A forkserver child inherits the server's state as of when the server started (lazily, at this process's first
start), not the parent's current one. So three things are handed over, applied in the child before the target or
its arguments are unpickled (that is, before they import anything), so it starts as a spawned child would:
- the environment: the parent's os.environ at start() plus the caller's overrides (CUDA_VISIBLE_DEVICES before any
  CUDA initialisation, MASTER_ADDR/PORT, the MESHSERVE_* switches kernels read at import, MESHSERVE_LAUNCH_TIME);
- stdout and stderr: the parent's current fds 1 and 2 (a log file it redirected to, pytest's captures);
- the server's "alive" pipe is closed in the child: the server exits once the parent is gone, so that
  die_with_parent() (PR_SET_PDEATHSIG, which watches the server, the child's real parent) still kills the child.

What the preloaded modules read from the environment at import is the server's, frozen: torch's TORCH_LOGS,
PYTORCH_JIT and compile settings, and OpenMP/MKL/OpenBLAS thread settings their libraries read as they load
(torch's own thread count is read later, and meshserve sets it explicitly: cpu_threads.py). Hence no meshserve
module is preloaded (kernels read MESHSERVE_* at import), nor transformers / huggingface_hub (HF_* settings), and
nothing that initialises CUDA: `import torch` does not, and a server that had would hand every child a broken CUDA
context.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing import reduction

ENV = "MESHSERVE_MP_START"
METHODS = ("forkserver", "spawn")
# imported once by the forkserver. Each reads no meshserve, CUDA, HF or MASTER_* setting at import and calls
# nothing of torch.cuda (tests/distributed/test_process_start.py). Only what the engine core imports: the first
# core waits for the whole preload, and so does the server's API process before its own imports. Not
# torch.distributed.tensor (with sympy, ~0.6 s of a 2-core CPU): transformers' config code reached it, which the
# core no longer imports (models/hf_config.py; tests/engine/test_core_imports.py)
PRELOAD = ("torch", "torch.distributed", "numpy", "msgspec", "zmq")


def start_method() -> str:
    """'forkserver' on Linux, 'spawn' elsewhere, unless MESHSERVE_MP_START names one."""
    chosen = os.environ.get(ENV, "").strip().lower()
    if chosen:
        if chosen not in METHODS:
            raise ValueError(f"{ENV}={chosen!r}: expected one of {', '.join(METHODS)}")
        if chosen == "forkserver" and not sys.platform.startswith("linux"):
            return "spawn"
        return chosen
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


def context() -> multiprocessing.context.BaseContext:
    """The context for this process's children and what they share (pipes, queues, shared arrays)."""
    ctx = multiprocessing.get_context(start_method())
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(list(PRELOAD))  # per process: takes effect when its server starts
    return ctx


def warm_up() -> None:
    """Start this process's forkserver now, if that is the start method: it imports PRELOAD in the background
    while the caller goes on (the engine loads its config), so its first child need not wait for it."""
    ctx = context()
    if ctx.get_start_method() == "forkserver":
        _ensure_forkserver()


def _ensure_forkserver() -> None:
    """Start this process's forkserver (if not yet running) ignoring SIGTERM: a SIGTERM to the whole process
    group (`timeout`, a service manager, `kill -- -PGID`) would otherwise kill it and, through PR_SET_PDEATHSIG,
    every child it forked: the engine core mid-drain (whose semaphores then leak). The server needs no signal: it
    exits once its parent is gone. A child gets its parent's SIGTERM disposition back (_arrive). SIGTERM is
    blocked meanwhile (Linux keeps a blocked signal pending even while ignored), so none to this process is lost."""
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():  # signal.signal works in the main thread only
        forkserver.ensure_running()
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    handler = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # kept through exec, unlike a handler or the mask
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGTERM, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def new_process(target: Callable, args: tuple = (), kwargs: dict | None = None, *, name: str | None = None,
                daemon: bool | None = None, env: dict[str, str] | None = None) -> multiprocessing.process.BaseProcess:
    """A process of context() that runs target(*args, **kwargs) with this process's environment at start()
    plus env on top (this process's os.environ is left alone)."""
    cls = _ForkServerChild if context().get_start_method() == "forkserver" else _SpawnChild
    return cls(target=target, args=args, kwargs=kwargs or {}, name=name, daemon=daemon, env=env)


class _HandedOver:
    """A process whose pickled form, read in the child, first applies the environment (and, from a forkserver,
    the standard streams) it carries: pickle calls _arrive before it reads the state holding the target."""

    def __init__(self, *, env: dict[str, str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self._env_overrides = dict(env or {})
        self._child_env: dict[str, str] | None = None

    def start(self) -> None:
        self._child_env = {**os.environ, **self._env_overrides}
        self._ignores_sigterm = signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        if self._start_method == "forkserver":
            _ensure_forkserver()
        super().start()

    def __reduce__(self):  # only multiprocessing pickles a process, while it starts it
        state = self.__dict__.copy()
        state["_child_env"] = None
        starting = multiprocessing.context.get_spawning_popen() is not None  # (not a copy.copy)
        streams = _std_streams() if self._start_method == "forkserver" and starting else None
        ignores_sigterm = getattr(self, "_ignores_sigterm", None) if starting else None
        return _arrive, (type(self), self._child_env, streams, ignores_sigterm), state


if sys.platform != "win32":
    class _ForkServerChild(_HandedOver, multiprocessing.context.ForkServerProcess):
        pass
else:  # pragma: no cover - no forkserver there; start_method() never picks it
    _ForkServerChild = None


class _SpawnChild(_HandedOver, multiprocessing.context.SpawnProcess):
    pass


def _std_streams() -> list | None:
    """fds 1 and 2 of this process, to be passed to the child (the fd passing multiprocessing uses for pipes)."""
    try:
        for fd in (1, 2):
            os.fstat(fd)
    except OSError:  # closed (a daemonised parent): the child keeps the server's
        return None
    return [reduction.DupFd(fd) for fd in (1, 2)]


def _arrive(cls, env: dict[str, str] | None, streams: list | None, ignores_sigterm: bool | None = None):
    """In the child, while its process object is unpickled: become the child the parent meant to start."""
    if env is not None:
        threads = os.environ.get("OMP_NUM_THREADS")
        for key in [k for k in os.environ if k not in env]:
            del os.environ[key]
        os.environ.update(env)  # putenv too: native code (the CUDA driver, NCCL) reads the C environment
        if env.get("OMP_NUM_THREADS") != threads:
            _set_torch_threads(env.get("OMP_NUM_THREADS"))
    if streams is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        for target_fd, passed in zip((1, 2), streams):
            fd = passed.detach()
            if fd != target_fd:
                os.dup2(fd, target_fd)
                os.close(fd)
    _leave_parents_server()
    if ignores_sigterm is False and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the forkserver's (_ensure_forkserver), not the parent's
    return cls.__new__(cls)


def _set_torch_threads(value: str | None) -> None:
    """torch read OMP_NUM_THREADS when the forkserver imported it: a child whose parent set it since gets the
    parent's value, as a spawned child (reading it afresh) would."""
    torch = sys.modules.get("torch")
    if torch is not None and value and value.isdigit() and int(value) > 0:
        torch.set_num_threads(int(value))


def _leave_parents_server() -> None:
    """Close the forkserver's "alive" pipe, which every forked child inherits: the server (and, through
    PR_SET_PDEATHSIG, its children) lives on while any of them holds it, whether or not the parent lives."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is not None:
        return  # this process started a server of its own: its pipe is its own
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None
        server._forkserver_address = None
