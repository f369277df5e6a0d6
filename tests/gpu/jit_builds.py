"""Counts the Triton kernel specializations a process builds while a block runs (Triton's jit_cache_hook: called
once per new (kernel, argument specialization, constexprs) in this process, before its compile or disk-cache
load). Shared by the GPU tests that assert nothing compiles after the engine's start-up."""

from __future__ import annotations

from typing import Self

from triton import knobs


class TritonBuilds:
    """with TritonBuilds() as builds: ...; builds.entries lists (kernel, constexprs, specialization) built."""

    def __init__(self):
        self.entries: list[tuple[str, dict, dict]] = []
        self._before = None

    def _hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled, **_):
        consts = {k: v for k, v in compile["constants"].items() if isinstance(v, (int, float, bool, str))}
        attrs = {k: v for k, v in compile["configs"][0].items() if v}  # argument index -> its specialization
        self.entries.append((repr, consts, attrs))
        # returning nothing (falsy): Triton goes on compiling

    def __enter__(self) -> Self:
        self._before = knobs.runtime.jit_cache_hook
        knobs.runtime.jit_cache_hook = self._hook
        return self

    def __exit__(self, *exc) -> None:
        knobs.runtime.jit_cache_hook = self._before

    def report(self) -> str:
        return "\n".join(f"{name} {consts} {attrs}" for name, consts, attrs in self.entries)
