"""freeze_startup_heap: what exists at start-up leaves the collector's reach; what requests allocate does not."""

import gc

from meshserve.serve.heap import freeze_startup_heap


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
