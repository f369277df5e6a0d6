"""The start-up timeline: phases per process against the launch, one summary line, and LLM()'s own line."""

import logging
import os
import subprocess
import sys
import time

import pytest

from meshserve.engine import startup_timeline
from meshserve.engine.startup_timeline import Mark, Segment
from meshserve.kernels import triton_build_clock


def test_phases_charge_each_mark_the_time_since_the_previous_and_the_summary_names_every_process():
    api = Segment(
        "api",
        1,
        100.0,
        100.0,
        [Mark("imports", 102.0), Mark("waiting for the core", 109.0), Mark("listening", 109.5)],
    )
    core = Segment(
        "core",
        2,
        100.5,
        100.0,
        [Mark("imports", 103.0), Mark("config", 104.0), Mark("prefill + eager warm-ups", 108.0, 1.5, 12)],
    )
    assert [(p, round(s, 3)) for p, s, _, _ in core.phases()] == [
        ("imports", 2.5),
        ("config", 1.0),
        ("prefill + eager warm-ups", 4.0),
    ]
    line = startup_timeline.summary([api, core])
    assert line.startswith(
        "start-up, seconds since launch: api [+0.0]: imports 2.0, waiting for the core 7.0, "
        "listening 0.5 -> 9.5 | core [+0.5]: imports 2.5, config 1.0, "
    )
    assert "prefill + eager warm-ups 4.0 (Triton 1.5 s, 12 kernels) -> 8.0" in line
    assert line.endswith("(ready in 9.5 s)")
    assert startup_timeline.ready_seconds([api, core]) == pytest.approx(9.5)
    # the core's segment of an in-process core is this process's own: not twice
    assert startup_timeline.merge(api, [Segment("api", 1, 0.0, 0.0), core]) == [api, core]


def test_a_child_reads_its_own_start_and_the_launch_its_parent_passed_down():
    code = (
        "from meshserve.engine import startup_timeline as t; import time; "
        "print(t.process_start_time(), t.launch_time(), time.time())"
    )
    before = time.time()
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, startup_timeline.LAUNCH_ENV: "123.5"},
    ).stdout.split()
    start, launch, now = map(float, out)
    assert before - 0.05 <= start <= now  # /proc's start time: after the spawn, before it printed
    assert launch == 123.5
    env = {k: v for k, v in os.environ.items() if k != startup_timeline.LAUNCH_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    start, launch, _ = map(float, out.stdout.split())
    assert launch == pytest.approx(start, abs=0.01)  # no parent's launch: its own start


def test_a_later_engine_in_the_same_process_measures_from_its_own_begin(monkeypatch):
    monkeypatch.setattr(startup_timeline, "_segment", None)
    first = startup_timeline.begin("cli", hand_over=True)
    assert first.start == pytest.approx(startup_timeline.process_start_time(), abs=0.05)
    startup_timeline.mark("python + CLI")
    assert startup_timeline.begin("api") is first and first.label == "api"  # handed over: relabelled, kept
    assert startup_timeline.current() is first
    t = time.time()
    second = startup_timeline.begin("LLM")  # not handed over: a start of its own, from now
    assert second is not first and not second.marks
    assert t <= second.start == second.launch <= time.time()


def test_the_triton_build_clock_times_builds_between_the_hooks_and_keeps_hooks_already_there(monkeypatch):
    knobs = pytest.importorskip("triton").knobs
    calls = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: calls.append("cache"))
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: calls.append("post"))
    for name, value in (("_installed", False), ("_seconds", 0.0), ("_count", 0), ("_started", None)):
        monkeypatch.setattr(triton_build_clock, name, value)
    assert triton_build_clock.install()
    knobs.runtime.jit_cache_hook(repr="k")
    time.sleep(0.02)
    knobs.runtime.jit_post_compile_hook(repr="k")
    seconds, count = triton_build_clock.totals()
    assert count == 1 and 0.02 <= seconds < 1.0
    assert calls == ["cache", "post"]
    monkeypatch.setattr(
        triton_build_clock, "_previous_cache_hook", lambda **kw: True
    )  # another hook skips it
    knobs.runtime.jit_cache_hook(repr="k")
    knobs.runtime.jit_post_compile_hook(repr="k")
    assert triton_build_clock.totals()[1] == 1


def test_llm_logs_its_start_up_as_one_line(tiny_model_dir, caplog):
    from meshserve import LLM

    with caplog.at_level(logging.INFO, logger="meshserve"):
        llm = LLM(tiny_model_dir("llama"), max_model_len=64)
    llm.shutdown()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up")]
    assert len(lines) == 1
    phases = [p.split(" ")[0] for p in lines[0].split("]: ", 1)[1].split(" -> ")[0].split(", ")]
    assert phases[:2] == ["before", "config"] and "weights" in phases and phases[-1] == "tokenizer"
    assert " | " not in lines[0]  # one process


@pytest.mark.slow  # a second rank process imports torch and joins the group: ~10-20 s on 2 busy cores
def test_worker_ranks_phases_reach_the_line(tiny_model_dir, caplog):
    from meshserve import LLM

    with caplog.at_level(logging.INFO, logger="meshserve"):
        llm = LLM(tiny_model_dir("llama"), max_model_len=64, tensor_parallel_size=2)
    llm.shutdown()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up"))
    rank1 = next(p for p in line.split(" | ") if p.startswith("rank1 "))
    phases = [p.split(" ")[0] for p in rank1.split("]: ", 1)[1].split(" -> ")[0].split(", ")]
    assert phases[0] == "joined" and "weights" in phases and phases[-1] == "KV"  # its KV pool, then gathered
    assert "joined the group" in line.split(" | ")[0]  # rank 0's, in the engine's own segment


@pytest.mark.gpu
def test_the_gpu_phases_are_named_apart_with_their_triton_builds(caplog):
    """On the device: the CUDA context, the dummy weights, the KV pool and each warm-up are phases of their own,
    and the warm-ups carry the seconds Triton spent loading or compiling their kernels."""
    from meshserve import LLM

    with caplog.at_level(logging.INFO, logger="meshserve"):
        llm = LLM("qwen3-0.6b", load_format="dummy", max_model_len=1024, device="cuda")
    llm.shutdown()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up"))
    for phase in (
        "CUDA context",
        "model built",
        "dummy weights",
        "KV sizing",
        "KV allocated",
        "prefill + eager warm-ups",
        "decode graphs",
        "sampling warm-up",
    ):
        assert f"{phase} " in line, phase
    assert "kernels)" in line  # Triton builds were timed (cache loads, or compiles on a cold cache)
