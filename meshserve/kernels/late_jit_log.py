"""Logs each Triton kernel specialization a process builds while it serves (after its engine's start-up).

Triton compiles a kernel once per specialization (integer arguments == 1 or divisible by 16, constexprs,
dtypes): ~0.5 s each with a cold cache, inside some user's request when it happens after start-up. The
start-up warm-ups (engine/eager_warmup.py, engine/sampling_warmup.py) aim at none; this makes any that remain
visible in the server's log, with the kernel and its constexprs, through Triton's jit_cache_hook (called only
when a new specialization is built: nothing per launch). A hook already installed (tools/jit_variants) keeps
running first, and its answer (True: skip the compile) stands.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_installed = False
_serving = False
_previous = None
_count = 0


def _hook(**kwargs):
    global _count
    answer = _previous(**kwargs) if _previous is not None else None
    if _serving:
        _count += 1
        compile_info = kwargs.get("compile") or {}
        consts = {
            k: v
            for k, v in (compile_info.get("constants") or {}).items()
            if isinstance(v, (int, float, bool, str))
        }
        logger.info(
            "Triton builds %s after start-up (a first-request compile, #%d): %s",
            kwargs.get("repr", "?"),
            _count,
            consts,
        )
    return answer


def _install() -> bool:
    global _installed, _previous
    if _installed:
        return True
    try:
        from triton import knobs

        _previous = knobs.runtime.jit_cache_hook
        knobs.runtime.jit_cache_hook = _hook
    except (ImportError, AttributeError):  # no Triton, or one without the hook: nothing to log
        return False
    _installed = True
    return True


def starting() -> None:
    """An engine starts in this process: its compiles are start-up, not serving."""
    global _serving
    _serving = False


def serving() -> bool:
    """The engine's start-up is over: log every build from now on. False if Triton has no hook here."""
    global _serving
    _serving = _install()
    return _serving


def late_builds() -> int:
    """Specializations built while serving, since the process started."""
    return _count
