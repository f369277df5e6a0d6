from meshserve.engine.step_profiler import StepProfiler


def test_profiler_writes_one_window_per_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHSERVE_PROFILE_SKIP", "2")
    monkeypatch.setenv("MESHSERVE_PROFILE_STEPS", "3")
    import torch

    prof = StepProfiler(rank=1, directory=str(tmp_path))
    for _ in range(8):
        prof.step()
        torch.ones(64, 64) @ torch.ones(64, 64)
    assert (tmp_path / "rank1.json").stat().st_size > 0
    text = (tmp_path / "rank1.txt").read_text()
    assert text.startswith("3 steps after 2") and "aten::mm" in text
    second = StepProfiler(rank=1, directory=str(tmp_path))  # a later engine in the same process and folder
    for _ in range(8):
        second.step()
    assert (tmp_path / "rank1-2.json").stat().st_size > 0 and (tmp_path / "rank1-2.txt").exists()
    assert (tmp_path / "rank1.txt").read_text() == text  # the first window is kept


def test_profiler_is_off_without_a_directory(monkeypatch):
    monkeypatch.delenv("MESHSERVE_PROFILE_DIR", raising=False)
    prof = StepProfiler(rank=0)
    for _ in range(100):
        prof.step()
    assert prof.dir is None and prof._prof is None


def test_engine_phases_appear_in_the_trace_only_when_profiling(tiny_model_dir, monkeypatch):
    # with MESHSERVE_PROFILE_DIR set the core marks schedule / launch / drain / outputs, which is what
    # tools/trace_gaps.py charges GPU idle time to; unset, phase() adds nothing
    import contextlib

    import torch

    from meshserve import LLM, SamplingParams
    from meshserve.engine import step_profiler

    monkeypatch.setattr(step_profiler, "_PHASES", True)
    llm = LLM(model=tiny_model_dir("llama"), dtype="float32", max_model_len=64, async_scheduling=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
    names = {e.key for e in prof.key_averages()}
    assert {"core.schedule", "core.launch", "core.drain", "core.outputs"} <= names
    monkeypatch.setattr(step_profiler, "_PHASES", False)
    assert isinstance(step_profiler.phase("core.schedule"), contextlib.nullcontext)
