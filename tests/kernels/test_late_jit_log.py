"""kernels/late_jit_log.py: Triton builds after start-up are counted and logged; a hook installed before keeps
running first and its answer stands; nothing is counted during start-up."""

from __future__ import annotations

import logging

from triton import knobs

from meshserve.kernels import late_jit_log


def _build(name="_kernel", **consts):
    return {
        "key": "k",
        "repr": name,
        "fn": None,
        "compile": {"constants": consts, "configs": [{}]},
        "is_manual_warmup": False,
        "already_compiled": False,
    }


def test_counts_and_logs_only_while_serving(monkeypatch, caplog):
    seen = []

    def earlier(**kw):
        seen.append(kw["repr"])
        return True  # e.g. a probe that skips compiling

    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", earlier)
    for name, value in (("_installed", False), ("_serving", False), ("_previous", None), ("_count", 0)):
        monkeypatch.setattr(late_jit_log, name, value)
    late_jit_log.starting()
    assert late_jit_log.serving() and knobs.runtime.jit_cache_hook is late_jit_log._hook
    late_jit_log.starting()  # a second engine starts in the process: its builds are start-up ones
    assert knobs.runtime.jit_cache_hook(**_build("_warm")) is True and late_jit_log.late_builds() == 0
    late_jit_log.serving()  # installed once: the earlier hook is still the one chained
    with caplog.at_level(logging.INFO, logger=late_jit_log.__name__):
        assert knobs.runtime.jit_cache_hook(**_build("_late", BLOCK=64)) is True
    assert late_jit_log.late_builds() == 1 and seen == ["_warm", "_late"]
    assert "_late" in caplog.text and "'BLOCK': 64" in caplog.text
