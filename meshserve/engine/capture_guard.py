"""Refusing Triton builds while a CUDA graph is captured, so that a capture may skip its eager warm-up run.

Each graph used to be captured after an eager run of the same forward (cuda_graph.capture_graph): that run is
what builds a Triton specialization the graph needs for the first time, outside the capture. But after the
start-up's eager warm-ups and a holder's first graph, the later graphs of a ladder mostly meet kernels already
built, and their warm-up runs were half the capture time (tools/capture_probe.py, Llama-3.1-8B on an H100: 40
mixed-step graphs 1.74 s with them, 0.71 s without; 20 decode graphs 0.69 s / 0.27 s; replays bit-equal).

So a later graph is first captured without the warm-up, inside refusing_builds(): Triton's jit_cache_hook
(called on an in-memory cache miss, before it compiles or loads from its disk cache) raises BuildRefused, the
forward stops before any build, the partial graph is dropped, and that one graph is captured again the old way.
Nothing is compiled or loaded inside a capture either way. Where this Triton has no hook, every capture warms up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

ENV = "MESHSERVE_CAPTURE_WARMUP"  # "1": an eager warm-up run before every capture (the plain path)


class BuildRefused(RuntimeError):
    """A capture met a Triton kernel specialization that is not built yet."""


def _refuse(**kwargs):
    raise BuildRefused(f"Triton would build {kwargs.get('repr', 'a kernel')} inside a CUDA-graph capture")


def _knobs():
    try:
        from triton import knobs
    except ImportError:
        return None
    return knobs if hasattr(knobs.runtime, "jit_cache_hook") else None


def available() -> bool:
    """Whether builds can be refused here (Triton with its jit_cache_hook)."""
    return _knobs() is not None


@contextlib.contextmanager
def refusing_builds() -> Iterator[None]:
    """Within: any Triton build raises BuildRefused. The hook installed before (late_jit_log's, a tool's) is put
    back after, however the block ends."""
    knobs = _knobs()
    if knobs is None:
        raise RuntimeError("this Triton has no jit_cache_hook: builds cannot be refused (check available())")
    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = _refuse
    try:
        yield
    finally:
        knobs.runtime.jit_cache_hook = previous
