"""freeze_startup_heap: what exists at start-up leaves the collector's reach; what requests allocate does not."""

import gc

import pytest

from meshserve.engine.heap import freeze_startup_heap


def test_startup_objects_are_frozen_and_later_ones_collected():
    startup_state = [{"tokenizer": "vocab"}]  # stands for the imports and tables that live as long as the process
    try:
        frozen = freeze_startup_heap()
        assert frozen > 0 and gc.get_freeze_count() > 0  # (other threads' frozen objects may die meanwhile)
        tracked = gc.get_objects()  # full collections walk only these from now on
        assert not any(o is startup_state for o in tracked)
        per_request = [{"delta": [1, 2]}]
        assert any(o is per_request for o in gc.get_objects())
        cycle: list = []
        cycle.append(cycle)  # garbage made while serving is still collected
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()  # the rest of the test session keeps the ordinary collector


def test_young_collection_threshold_from_the_environment_and_set_alone(monkeypatch):
    from meshserve.engine.heap import (
        CORE_YOUNG_THRESHOLD,
        set_young_collection_threshold,
        young_collection_threshold,
    )

    monkeypatch.delenv("MESHSERVE_CORE_GC_GEN0", raising=False)
    assert young_collection_threshold() == CORE_YOUNG_THRESHOLD
    monkeypatch.setenv("MESHSERVE_CORE_GC_GEN0", "700")
    assert young_collection_threshold() == 700
    before = gc.get_threshold()
    try:
        set_young_collection_threshold(12345)
        assert gc.get_threshold() == (12345, *before[1:])  # the older generations keep their ratios
        # garbage cycles are still collected once enough containers pile up, without an explicit collect
        collected = []
        gc.callbacks.append(lambda phase, info: phase == "stop" and collected.append(info["collected"]))
        for _ in range(3 * 12345):
            cycle: list = []
            cycle.append(cycle)
        assert sum(collected) > 0
    finally:
        gc.callbacks.pop()
        gc.set_threshold(*before)


def test_offline_freeze_applies_on_a_gpu_by_default_and_as_the_switch_says(monkeypatch):
    from meshserve.engine.heap import OFFLINE_FREEZE_ENV, offline_freeze_applies

    monkeypatch.delenv(OFFLINE_FREEZE_ENV, raising=False)
    assert offline_freeze_applies("cuda") and offline_freeze_applies("cuda:1") and not offline_freeze_applies("cpu")
    monkeypatch.setenv(OFFLINE_FREEZE_ENV, "1")
    assert offline_freeze_applies("cpu")
    monkeypatch.setenv(OFFLINE_FREEZE_ENV, "0")
    assert not offline_freeze_applies("cuda")
    monkeypatch.setenv(OFFLINE_FREEZE_ENV, "yes")
    with pytest.raises(ValueError, match="expected auto, 1 or 0"):
        offline_freeze_applies("cpu")


def test_an_offline_run_freezes_what_exists_at_its_start_and_gives_the_collector_back(tiny_model_dir, monkeypatch):
    """LLM(...).generate runs the core in the caller's process: with the switch on (on a GPU by default) what
    exists when the run starts is frozen and young collections are rarer while it runs, as in the core process;
    afterwards the collector is as before (nothing frozen between runs: a dropped engine's cycles still go).
    Objects frozen by someone else are left alone."""
    from meshserve import LLM, SamplingParams
    from meshserve.engine.heap import OFFLINE_FREEZE_ENV, young_collection_threshold

    monkeypatch.setenv(OFFLINE_FREEZE_ENV, "1")
    llm = LLM(tiny_model_dir("llama"), max_model_len=64)
    before = gc.get_threshold()
    seen = []

    def step_and_look(*args, **kwargs):  # what the collector looks like inside the run
        seen.append((gc.get_freeze_count(), gc.get_threshold(),
                     any(o is llm.engine.scheduler for o in gc.get_objects())))
        return step(*args, **kwargs)

    step, llm.engine.step = llm.engine.step, step_and_look
    try:
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
        frozen, threshold, scheduler_tracked = seen[0]
        assert frozen > 1000 and threshold == (young_collection_threshold(), *before[1:]) and not scheduler_tracked
        assert gc.get_freeze_count() == 0 and gc.get_threshold() == before  # given back
        gc.freeze()  # someone else's: a run leaves it and the thresholds alone
        seen.clear()
        llm.generate([[1, 2]], SamplingParams(max_tokens=2), use_tqdm=False)
        assert seen[0][1] == before and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        llm.shutdown()


def test_a_bad_offline_freeze_switch_is_refused_before_the_model_loads(monkeypatch):
    from meshserve import LLM
    from meshserve.engine.heap import OFFLINE_FREEZE_ENV

    monkeypatch.setenv(OFFLINE_FREEZE_ENV, "sometimes")
    with pytest.raises(ValueError, match=OFFLINE_FREEZE_ENV):
        LLM("/nonexistent/but/never/reached", load_format="dummy")
