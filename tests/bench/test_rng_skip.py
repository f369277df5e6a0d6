"""bench/rng_skip.py: skipping randint draws leaves Python's generator exactly where the draws would have."""

from __future__ import annotations

import random

import pytest

from meshserve.bench.rng_skip import skip_randints
from meshserve.bench.serve_bench import w3_arrivals, w3_requests


@pytest.mark.parametrize(("count", "low", "high"), [
    (0, 3, 10000), (1, 0, 10), (20000, 3, 10000),  # W3's ids: 9,998 values, 14 bits, ~39% of words redrawn
    (5000, 0, 1), (3000, 0, 0),  # one bit; a range of one value (every other word redrawn)
    (4000, 1, 2**20 + 5), (2000, -(2**31), 2**31 - 2),  # just past a power of two; all 32 bits
])
def test_the_generator_ends_where_the_draws_leave_it(count, low, high):
    drawn, skipped = random.Random(count + low), random.Random(count + low)
    for _ in range(count):
        drawn.randint(low, high)
    skip_randints(count, low, high, skipped)
    assert skipped.getstate() == drawn.getstate()
    assert skipped.random() == drawn.random()


def test_the_module_generator_by_default():
    random.seed(8)
    for _ in range(700):
        random.randint(3, 10000)
    want = random.getstate()
    random.seed(8)
    skip_randints(700, 3, 10000)
    assert random.getstate() == want


def test_ranges_past_32_bits_are_refused():
    with pytest.raises(ValueError, match="2\\*\\*32 - 1 values"):
        skip_randints(1, 0, 2**32 - 1)  # 2**32 values: 33 bits, two words a draw


@pytest.mark.parametrize(("qps", "num_prompts"), [(5.0, None), (32.0, 50), (float("inf"), 30)])
def test_w3_arrivals_are_w3_requests_send_times(qps, num_prompts):
    want = [r.send_at for r in w3_requests(qps, num_prompts, 512, 128, seed=77)]
    assert w3_arrivals(qps, num_prompts, 512, seed=77) == want
