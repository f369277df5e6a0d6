"""How long this process spent building Triton kernel specializations: loaded from the on-disk cache, or compiled.

Triton calls knobs.runtime.jit_cache_hook before it builds a new specialization and jit_post_compile_hook after
(never per launch), so the time between the two is that build: a few ms when the cache (TRITON_CACHE_DIR) holds
it, ~0.5 s when it compiles. The start-up timeline (engine/startup_timeline.py) reads the total at each phase,
so a cold cache shows up as its own seconds inside the warm-ups. Hooks already installed keep running (chained).
"""

from __future__ import annotations

import time

_installed = False
_previous_cache_hook = None
_previous_post_hook = None
_started: float | None = None
_seconds = 0.0
_count = 0


def _cache_hook(**kwargs):
    global _started
    answer = _previous_cache_hook(**kwargs) if _previous_cache_hook is not None else None
    _started = None if answer else time.perf_counter()  # True: another hook skips the build
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


def totals() -> tuple[float, int]:
    """(seconds, specializations) built in this process since install()."""
    return _seconds, _count
