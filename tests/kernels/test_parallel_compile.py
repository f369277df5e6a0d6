"""The parallel pre-compile's mechanism (kernels/parallel_compile.py) on the CPU, where Triton compiles
nothing: launches of the deferring thread become warmup=True launches (others' do not), compiles submitted the
way Triton's JITFunction submits them under AsyncCompileMode run on the pool at once, the pass returns only
once each kernel is finalized (put in its cache), the pool builds each kernel's launcher, and a failed compile
is left for the plain warm-up. tests/gpu/test_gpu_parallel_compile.py runs the real thing."""

from __future__ import annotations

import inspect
import threading
import time

import pytest

triton = pytest.importorskip("triton")

from triton.runtime import _async_compile  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from meshserve.kernels import parallel_compile, triton_build_clock  # noqa: E402
from meshserve.kernels.parallel_compile import compile_in_parallel, deferred_launches  # noqa: E402


def _copy(x_ptr, y_ptr, n):  # a kernel body; only its launch path is exercised
    pass


@pytest.fixture(autouse=True)
def _own_build_clock(monkeypatch):
    """The passes here add to the process's Triton build clock: restored after each test (the start-up
    timeline of a later test in this process counts from it)."""
    monkeypatch.setattr(triton_build_clock, "_seconds", 0.0)
    monkeypatch.setattr(triton_build_clock, "_count", 0)


@pytest.fixture
def launches(monkeypatch):
    """JITFunction.run replaced by a recorder of (thread, warmup) per launch, under the deferring patch."""
    seen = []

    def run(self, *args, grid, warmup, **kwargs):
        seen.append((threading.current_thread().name, warmup))

    monkeypatch.setattr(JITFunction, "run", run)
    return seen


def test_only_the_deferring_threads_launches_become_warmups(launches):
    kernel = JITFunction(_copy)  # a compiled-path kernel whatever TRITON_INTERPRET says
    recorder = JITFunction.run
    kernel[(1,)](0, 0, 4)
    with deferred_launches():
        kernel[(1,)](0, 0, 4)
        other = threading.Thread(target=lambda: kernel[(1,)](0, 0, 4), name="other")
        other.start()
        other.join()
        with deferred_launches():  # nested: still deferred, and the outer block still restores
            kernel[(1,)](0, 0, 4)
    kernel[(1,)](0, 0, 4)
    main = threading.current_thread().name
    assert launches == [(main, False), (main, True), ("other", False), (main, True), (main, False)]
    assert JITFunction.run is recorder


def _submit(mode, key, compile_fn, finalize_fn):
    """A compile submitted as JITFunction._do_compile does (Triton 3.9 adds a cleanup callback)."""
    extra = [lambda future_kernel: None] if len(inspect.signature(mode.submit).parameters) > 3 else []
    return mode.submit(key, compile_fn, finalize_fn, *extra)


class _Kernel:
    def __init__(self, name):
        self.name = name


def test_compiles_run_together_and_are_finalized_before_the_pass_returns(monkeypatch):
    built = []
    monkeypatch.setattr(parallel_compile, "build_launcher", lambda kernel: built.append(kernel.name))
    both = threading.Barrier(2, timeout=10)  # each compile waits for the other: one at a time would time out
    threads, cache = set(), {}

    def compile_fn(name):
        def run():
            threads.add(threading.current_thread().name)
            both.wait()
            if name == "a":  # as long as a real compile: counted as compiled, "b" as a disk-cache load
                time.sleep(parallel_compile.COMPILED_S + 0.05)
            return _Kernel(name)

        return run

    def steps():
        mode = _async_compile.active_mode.get()
        assert mode is not None
        for name in ("a", "b", "a"):  # the second "a" is the same specialization: submitted once
            _submit(mode, name, compile_fn(name), lambda kernel: cache.setdefault(kernel.name, kernel))
        assert not cache  # nothing finalized while the steps run

    clock_before = triton_build_clock.totals()
    done = compile_in_parallel(steps, workers=2, what="test")
    assert done.submitted == 2 and done.compiled == 1 and done.workers == 2
    # the start-up timeline's Triton clock gets both builds, timed in their threads
    seconds, count = (a - b for a, b in zip(triton_build_clock.totals(), clock_before))
    assert count == 2 and seconds >= parallel_compile.COMPILED_S
    assert sorted(cache) == ["a", "b"] and sorted(built) == ["a", "b"]
    assert len(threads) == 2 and all(t.startswith("triton-compile") for t in threads)
    assert _async_compile.active_mode.get() is None


def test_a_failed_compile_is_left_for_the_plain_warm_up(monkeypatch):
    monkeypatch.setattr(parallel_compile, "build_launcher", lambda kernel: None)
    cache = {}

    def broken():
        raise RuntimeError("ptxas failed")

    def steps():
        mode = _async_compile.active_mode.get()
        _submit(mode, "bad", broken, lambda kernel: cache.setdefault("bad", kernel))
        _submit(mode, "good", lambda: _Kernel("good"), lambda kernel: cache.setdefault("good", kernel))

    done = compile_in_parallel(steps, workers=2)
    assert done.submitted == 2 and list(cache) == ["good"]


def test_the_launcher_is_built_the_way_the_first_launch_builds_it(monkeypatch):
    from triton.runtime.driver import driver

    made = []

    class Launcher:
        def __init__(self, src, metadata):
            made.append((src, metadata))

    class Active:
        launcher_cls = Launcher

    monkeypatch.setattr(driver, "_active", Active(), raising=False)
    monkeypatch.setattr(type(driver), "active", property(lambda self: self._active), raising=False)
    kernel = _Kernel("k")
    kernel.src, kernel.metadata = "src", "meta"
    parallel_compile.build_launcher(kernel)
    assert made == [("src", "meta")]
    # no launcher class (another Triton, or no driver): left to the first launch, no error
    monkeypatch.setattr(driver, "_active", object(), raising=False)
    parallel_compile.build_launcher(kernel)
    assert len(made) == 1
