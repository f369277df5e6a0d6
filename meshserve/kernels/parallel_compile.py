"""Compile the Triton kernels a block of start-up work reaches on a thread pool, all at once (issue 29).

A cold start compiles its kernels one after another inside the warm-ups (~0.3-0.5 s each). Triton's
AsyncCompileMode (triton/runtime/_async_compile.py, Triton 3.6 through 3.9) hands the compile of a launch that
misses the in-memory kernel cache to an executor and returns a FutureKernel; when the mode exits it waits for
every future and puts each kernel in its JITFunction's cache. The launch itself, though, waits: a plain launch
(warmup=False) calls the FutureKernel's result() before it runs (3.6: `kernel.result()` in JITFunction.run;
3.9: `kernel.launch_metadata`, forwarded to result()), so launches alone gain nothing. Only warmup=True
launches return without waiting, and they launch nothing.

So the pass runs the start-up's kernel-reaching steps once with every Triton launch of this thread turned into
a warmup=True launch (deferred_launches): each new specialization's compile goes to the pool, no kernel runs,
and the torch ops between them run on whatever the skipped kernels' outputs held. The pass is only valid where
nothing on the host or in torch indexing depends on those outputs: the runner's forward steps on one rank
(engine/parallel_warmup.py says which steps and why). Then the normal warm-ups and captures run and find every
kernel the pass compiled in memory.

The pool also builds each kernel's launcher: Triton 3.6 generates a C launcher per kernel signature and
compiles it with the host C compiler at the kernel's first launch (CompiledKernel._init_handles ->
driver.active.launcher_cls -> runtime/build.compile_module_from_src, cached on disk by source hash), one
after another in the engine's thread on a cold cache. Building it beside the compile leaves the first launch
a load from the disk cache.

Threads, not processes: Triton 3.6 releases the GIL in its long C++ calls (the MLIR pass pipelines, LLVM's
optimisation and PTX emission: a GIL-holding Python thread kept running beside them, measured 2026-12-01) and
ptxas is a subprocess; the Python front end (AST to TTIR) is a few percent of a compile. Measured in the
engine, though, threads reached ~2.1x on 16 cores (the profile pass's 5 kernels, 4.3-4.9 s of compiles, in
3.0-4.0 s; the warm-ups' 15, 13.8-14.5 s, in 5.8-6.8 s): most of a compile holds the GIL. AsyncCompileMode's
compile closures do not pickle; processes=True (MESHSERVE_PARALLEL_COMPILE=procs) captures each as plain data
and compiles it in a worker process into the shared disk cache, the thread then loading it
(kernels/compile_job.py, kernels/process_compile_pool.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from meshserve.kernels import triton_build_clock

logger = logging.getLogger(__name__)

_deferring = threading.local()  # .active: this thread's Triton launches are deferred


@dataclass(frozen=True)
class CompilePass:
    """What one parallel pre-compile pass did."""

    submitted: int  # distinct specializations whose compile (or disk-cache load) went to the pool
    compiled: int  # of those, builds of COMPILED_S or more: compiles (a disk-cache load takes milliseconds)
    seconds: float  # the whole pass: the steps, then the wait for the last compile
    workers: int
    processes: bool = False  # the compiles went to worker processes (kernels/process_compile_pool.py)
    fallbacks: int = 0  # with processes: compiled in this process instead (not capturable, a child failed)


COMPILED_S = 0.1  # a build this long compiled (MLIR, LLVM, ptxas: 0.2 s and more); loads take ~1-20 ms


def default_workers() -> int:
    """One compile per core the process may run on (ptxas and LLVM each keep one core busy)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def async_compile_available() -> bool:
    """Whether this Triton has AsyncCompileMode (3.6 and later) and the JITFunction.run it defers through."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode  # noqa: F401
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return hasattr(JITFunction, "run")


@contextlib.contextmanager
def deferred_launches():
    """Inside the block, every Triton JIT launch made by this thread is a warmup=True launch: it specializes
    and (under AsyncCompileMode) submits its compile, and launches nothing. Other threads launch as usual."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run
    if getattr(original, "_meshserve_deferring", False):  # nested: the outer block's patch serves
        yield
        return

    def run(self, *args, grid, warmup, **kwargs):
        if getattr(_deferring, "active", False):
            warmup = True
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    run._meshserve_deferring = True
    JITFunction.run = run
    _deferring.active = True
    try:
        yield
    finally:
        _deferring.active = False
        JITFunction.run = original


def build_launcher(kernel) -> None:
    """Build (and so cache on disk) the kernel's launcher as its first launch would; a Triton without the
    per-kernel launcher, or any failure here, leaves it to that launch."""
    try:
        from triton.runtime.driver import driver

        driver.active.launcher_cls(kernel.src, kernel.metadata)
    except Exception as e:  # the first launch builds it, and reports a real problem there
        logger.debug("launcher of %s left to its first launch: %r", getattr(kernel, "name", "?"), e)


class CompilePool(ThreadPoolExecutor):
    """A thread pool whose tasks (AsyncCompileMode's compiles) also build the compiled kernel's launcher, and
    which keeps each task's seconds (build_seconds)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.build_seconds: list[float] = []

    def submit(self, fn, /, *args, **kwargs):
        def compile_and_build_launcher():
            t0 = time.perf_counter()
            try:
                kernel = fn(*args, **kwargs)
                build_launcher(kernel)
                return kernel
            finally:
                self.build_seconds.append(time.perf_counter() - t0)  # list.append: atomic under the GIL

        return super().submit(compile_and_build_launcher)


def compile_in_parallel(steps: Callable[[], object], workers: int, what: str = "start-up kernels",
                        processes: bool = False) -> CompilePass:
    """Run steps() with launches deferred under AsyncCompileMode on `workers` threads (processes: each compile
    in one of `workers` processes, its thread loading the result), then wait for every compile. A compile that
    fails is left out of the kernel cache (ignore_errors): the normal warm-up meets it again and fails where it
    always would."""
    from triton.runtime._async_compile import AsyncCompileMode

    t0 = time.perf_counter()
    if processes:
        from meshserve.kernels.process_compile_pool import ProcessCompilePool, compile_processes

        pool = ProcessCompilePool(compile_processes(workers), max_workers=workers,
                                  thread_name_prefix="triton-compile")
    else:
        pool = CompilePool(max_workers=workers, thread_name_prefix="triton-compile")
    try:
        with triton_build_clock.paused(), AsyncCompileMode(pool, ignore_errors=True) as mode:
            with deferred_launches():
                steps()
            submitted = len(mode.future_kernels)  # read before exit: Triton 3.9 clears it there
    finally:
        pool.shutdown(wait=True)
        triton_build_clock.add(sum(pool.build_seconds), len(pool.build_seconds))
    compiled = sum(s >= COMPILED_S for s in pool.build_seconds)
    done = CompilePass(submitted, compiled, time.perf_counter() - t0, workers, processes,
                       getattr(pool, "fallbacks", 0))
    logger.info("%s: %d Triton specializations (%d compiled, the rest loaded from the disk cache) on %d "
                "%s in %.1f s%s", what, done.submitted, done.compiled, done.workers,
                "processes" if processes else "threads", done.seconds,
                f" ({done.fallbacks} compiled in the engine process)" if processes else "")
    return done
