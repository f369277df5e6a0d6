"""How long this process spent building Triton kernel specializations: loaded from the on-disk cache, or compiled.

Triton calls knobs.runtime.jit_cache_hook before it builds a new specialization and jit_post_compile_hook after
(never per launch), so the time between the two is that build: a few ms when the cache (TRITON_CACHE_DIR) holds
it, ~0.5 s when it compiles. The start-up timeline (engine/startup_timeline.py) reads the total at each phase,
so a cold cache shows up as its own seconds inside the warm-ups. Hooks already installed keep running (chained).
Not counted: the kernel's C launcher, which Triton 3.6 builds with the host compiler at the first
launch (~0.4 s cold, measured 2026-12-01), after the post hook; a parallel pre-compile pass builds it in its
threads and add()s its builds' thread-seconds.
"""

from __future__ import annotations

import contextlib
import time

_installed = False
_previous_cache_hook = None
_previous_post_hook = None
_started: float | None = None
_paused = False
_seconds = 0.0
_count = 0


def _cache_hook(**kwargs):
    global _started
    answer = _previous_cache_hook(**kwargs) if _previous_cache_hook is not None else None
    # True: another hook skips the build; paused: a parallel pass counts its builds itself (add)
    _started = None if answer or _paused else time.perf_counter()
    return answer


def _post_hook(**kwargs):
    global _started, _seconds, _count
    if _started is not None:
        _seconds += time.perf_counter() - _started
        _count += 1
        _started = None
    return _previous_post_hook(**kwargs) if _previous_post_hook is not None else None


def install() -> bool:
    """Start counting (once per process); False without Triton or without its hooks."""
    global _installed, _previous_cache_hook, _previous_post_hook
    if _installed:
        return True
    try:
        from triton import knobs

        _previous_cache_hook = knobs.runtime.jit_cache_hook
        _previous_post_hook = knobs.runtime.jit_post_compile_hook
        knobs.runtime.jit_cache_hook = _cache_hook
        knobs.runtime.jit_post_compile_hook = _post_hook
    except (ImportError, AttributeError):
        return False
    _installed = True
    return True


@contextlib.contextmanager
def paused():
    """Builds inside the block are not timed by the hooks: under Triton's AsyncCompileMode (kernels/
    parallel_compile.py) the hook pairs interleave on other threads; the pass add()s its own totals."""
    global _paused, _started
    _paused, _started = True, None
    try:
        yield
    finally:
        _paused = False


def add(seconds: float, count: int) -> None:
    """Count builds timed elsewhere (a parallel pass: the seconds of every thread, so more than wall time)."""
    global _seconds, _count
    _seconds += seconds
    _count += count


def totals() -> tuple[float, int]:
    """(seconds, specializations) built in this process since install()."""
    return _seconds, _count
