"""Inter-token gaps kept raw and binned in bulk give the histogram of the same gaps binned one by one."""

from __future__ import annotations

import random

import numpy as np

from meshserve.simulator.metrics import RunRecorder


def test_linear_gaps_bin_like_one_by_one():
    rng = random.Random(3)
    for _ in range(100):
        first, slope = rng.uniform(1e-3, 0.05), rng.choice([0.0, rng.uniform(0, 2e-5), rng.uniform(0, 3e-4)])
        steps, count = rng.randint(1, 1000), rng.randint(1, 4)
        bulk, single = RunRecorder(), RunRecorder()
        bulk.add_itl_linear(first, slope, steps, count)
        bulk.add_itl_count(first * 3, count)
        for _ in range(count):
            single.add_itl(first * 3)
        for i in range(steps):
            for _ in range(count):
                single.add_itl(first + slope * i)  # one by one, binned as they come
        bulk._flush_itl(), single._flush_itl()
        assert np.array_equal(bulk.itl_counts, single.itl_counts)
