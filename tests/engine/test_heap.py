"""freeze_startup_heap: what exists at start-up leaves the collector's reach; what requests allocate does not."""

import gc

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
