"""The parallel pre-compile's executor with the compiles in worker processes (issue 29,
MESHSERVE_PARALLEL_COMPILE=procs).

Threads alone reach ~2.1x on the H200's 16 cores: most of a Triton compile holds the GIL (the Python front
end, the pass drivers). Here each compile AsyncCompileMode submits is captured as plain data
(kernels/compile_job.py) and compiled in one of a few pre-started processes (spawned: no CUDA in them, the
GPUTarget is passed), which writes it into the shared TRITON_CACHE_DIR. The thread task that AsyncCompileMode
waits on then runs Triton's own closure, which finds the entry on disk (a load of milliseconds) and returns the
CompiledKernel the parent's launches use. A compile that cannot be captured, or whose child fails (a key that
differs, a crash, a broken pool), is compiled by that thread as on the plain thread pool: the processes only
move compiles, never decide them.

The processes are started once per engine process (prestart(), at the runner's construction, so their
imports overlap the weights' load) and serve both passes; stop() ends them after the warm-ups.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import pkgutil
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor

from meshserve.kernels.compile_job import CompileJob, JobDone, NotCapturable, capture, child_init, run_job
from meshserve.kernels.parallel_compile import build_launcher

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_processes: ProcessPoolExecutor | None = None
_size = 0


def _ready() -> int:
    return os.getpid()


def _current_target():
    """This process's GPU target (the children compile for it), or None where there is no driver."""
    try:
        from triton.runtime.driver import driver

        return driver.active.get_current_target()
    except Exception:
        return None


def compile_processes(workers: int) -> ProcessPoolExecutor:
    """The process's compile processes (`workers` of them), started on the first call; a broken pool (a child
    killed) is replaced."""
    global _processes, _size
    with _lock:
        if _processes is not None and (_size != workers or getattr(_processes, "_broken", False)):
            _processes.shutdown(wait=False, cancel_futures=True)
            _processes = None
        if _processes is None:
            _processes = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=child_init, initargs=(kernel_modules(), _current_target()))
            _size = workers
            with _no_gpu_environment():
                for _ in range(workers):  # each submit spawns a process while none is idle: all start now
                    _processes.submit(_ready)
        return _processes


@contextlib.contextmanager
def _no_gpu_environment():
    """The environment the processes are spawned with (a copy of os.environ at spawn): no visible GPU, so
    that nothing they import can create a CUDA context (hundreds of MiB each, off the KV cache's free memory;
    the parent's CUDA is initialized already and does not read it again); no Triton interpreter."""
    saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")}
    os.environ.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="0")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kernel_modules() -> tuple[str, ...]:
    """meshserve's Triton kernel modules (kernels/triton_*.py; ~0.5 s after torch): the children import them
    as they start, beside the engine's weight load, rather than at their first job."""
    import meshserve.kernels

    package = meshserve.kernels.__name__
    return tuple(sorted(f"{package}.{m.name}" for m in pkgutil.iter_modules(meshserve.kernels.__path__)
                        if m.name.startswith("triton_")))


def prestart(workers: int) -> None:
    """Start the compile processes now: their imports (torch, Triton, the kernel modules: seconds) run beside
    the engine's weight load instead of inside the first pass."""
    compile_processes(workers)


def stop() -> None:
    """End the compile processes (the start-up's compiles are done)."""
    global _processes
    with _lock:
        if _processes is not None:
            _processes.shutdown(wait=False, cancel_futures=True)
            _processes = None


atexit.register(stop)


class ProcessCompilePool(ThreadPoolExecutor):
    """AsyncCompileMode's executor: each submitted compile goes to a process when it can be captured, then its
    thread task loads it from the disk cache (or compiles it, when the process did not) and builds the
    launcher. build_seconds holds each compile's seconds (the child's plus the local load or compile)."""

    def __init__(self, processes: ProcessPoolExecutor, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.processes = processes
        self.build_seconds: list[float] = []
        self.in_processes = 0  # compiled (or loaded) by a child
        self.fallbacks = 0  # compiled here: not capturable, or the child failed
        self._count_lock = threading.Lock()

    def _count(self, in_process: bool) -> None:
        with self._count_lock:
            if in_process:
                self.in_processes += 1
            else:
                self.fallbacks += 1

    def _send(self, fn) -> tuple[CompileJob | None, Future | None]:
        try:
            job = capture(fn)
        except NotCapturable as e:
            logger.info("compiled in the engine process: %s", e)
            return None, None
        except Exception as e:  # capture reads Triton internals: any surprise is a plain compile
            logger.warning("compile not sent to a process (%r); compiled in the engine process", e)
            return None, None
        try:
            return job, self.processes.submit(run_job, job)
        except Exception as e:  # a broken or shut-down pool
            logger.warning("compile process pool unavailable (%r); compiled in the engine process", e)
            return job, None

    def submit(self, fn, /, *args, **kwargs):
        job, remote = self._send(fn)

        def wait_then_load():
            child_s, in_process = 0.0, False
            if remote is not None:
                try:
                    done: JobDone = remote.result()
                    child_s, in_process = done.seconds, True
                except Exception as e:
                    logger.warning("compile of %s in a process failed (%r); compiled in the engine process",
                                   job.fn.qualname, e)
            self._count(in_process)
            t0 = time.perf_counter()
            try:
                kernel = fn(*args, **kwargs)  # Triton's closure: a disk-cache load after the child's compile
                build_launcher(kernel)
                return kernel
            finally:
                self.build_seconds.append(child_s + time.perf_counter() - t0)

        return super().submit(wait_then_load)
