"""The bucketed least-outstanding index makes the router policy's choices (the scan), tie counter included."""

from __future__ import annotations

import random

from meshserve.router.policy import LeastOutstanding
from meshserve.simulator.least_outstanding import LeastOutstandingIndex


class _Rep:
    def __init__(self, index: int):
        self.index = index
        self.outstanding = 0


def test_index_chooses_as_the_scan_does():
    rng = random.Random(1)
    reps = [_Rep(i) for i in range(37)]
    scan, index = LeastOutstanding(), LeastOutstandingIndex(len(reps))
    for _ in range(20_000):
        if rng.random() < 0.55:  # a request, sometimes a retry that excludes replicas already tried
            tried = tuple(rng.sample(range(len(reps)), rng.choice([0, 0, 0, 1, 2])))
            expected = scan.choose([r for r in reps if r.index not in tried])
            got = index.take() if not tried else index.choose(tried)
            assert got == expected.index
            if tried:
                index.add(got, 1)
            expected.outstanding += 1
        else:  # a finish somewhere
            busy = [r for r in reps if r.outstanding]
            if busy:
                r = rng.choice(busy)
                r.outstanding -= 1
                index.add(r.index, -1)
        assert index.counts == [r.outstanding for r in reps]


def test_every_replica_tried_is_none():
    index = LeastOutstandingIndex(2)
    assert index.choose((0, 1)) is None
