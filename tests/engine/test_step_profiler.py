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


def test_profiler_is_off_without_a_directory(monkeypatch):
    monkeypatch.delenv("MESHSERVE_PROFILE_DIR", raising=False)
    prof = StepProfiler(rank=0)
    for _ in range(100):
        prof.step()
    assert prof.dir is None and prof._prof is None
