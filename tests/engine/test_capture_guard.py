"""capture_guard: inside refusing_builds() a Triton build raises BuildRefused (Triton calls its jit_cache_hook on an
in-memory cache miss, before building); the hook installed before is put back however the block ends."""

from __future__ import annotations

import pytest

from meshserve.engine import capture_guard

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not capture_guard.available(), reason="this Triton has no jit_cache_hook")


def test_a_build_inside_is_refused_and_the_previous_hook_comes_back(monkeypatch):
    calls = []

    def previous(**kwargs):
        calls.append(kwargs["repr"])

    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", previous)
    with capture_guard.refusing_builds():
        with pytest.raises(capture_guard.BuildRefused, match="kernel_a"):
            triton.knobs.runtime.jit_cache_hook(repr="kernel_a", key="k")
    assert triton.knobs.runtime.jit_cache_hook is previous
    triton.knobs.runtime.jit_cache_hook(repr="kernel_b")
    assert calls == ["kernel_b"]  # the refused build never reached the hook before


def test_the_previous_hook_comes_back_when_the_block_raises(monkeypatch):
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", None)
    with pytest.raises(capture_guard.BuildRefused):
        with capture_guard.refusing_builds():
            triton.knobs.runtime.jit_cache_hook(repr="kernel_a")
    assert triton.knobs.runtime.jit_cache_hook is None


def test_refusing_builds_without_the_hook_says_so(monkeypatch):
    monkeypatch.setattr(capture_guard, "_knobs", lambda: None)
    assert not capture_guard.available()
    with pytest.raises(RuntimeError, match="no jit_cache_hook"):
        with capture_guard.refusing_builds():
            pass
