"""The router's least-outstanding choice over many replicas without a scan: replicas bucketed by their count.

meshserve/router/policy.py's LeastOutstanding scans every candidate for the least count, then takes the
tied ones round robin (one tick of its counter per choice). Over 100 replicas at 1,000 req/s that scan is a
large share of a simulated request; this index keeps each count's replicas in a sorted list and the least
count up to date as counts move by one, so a choice reads one bucket. Same choices as the scan, counter included
(tests/simulator/test_least_outstanding.py).
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, insort


class LeastOutstandingIndex:
    """Outstanding requests per replica (counts[i]) and the least-outstanding choice among them."""

    def __init__(self, num_replicas: int):
        self.counts = [0] * num_replicas
        self._buckets: dict[int, list[int]] = {0: list(range(num_replicas))}
        self._least = 0
        self._tie = itertools.count()

    def add(self, i: int, delta: int) -> None:
        """Replica i's count moves by delta (+1: sent to it; -1: it finished, shed or refused one)."""
        counts, buckets = self.counts, self._buckets
        old = counts[i]
        new = counts[i] = old + delta
        bucket = buckets[old]
        del bucket[bisect_left(bucket, i)]  # bucket.remove(i) by bisection: buckets are sorted
        if not bucket:
            del buckets[old]
        target = buckets.get(new)
        if target is None:
            buckets[new] = [i]
        else:
            insort(target, i)
        least = self._least
        if new < least:
            self._least = new
        elif old == least and not bucket:
            self._least = min(buckets) if delta != 1 else new

    def drop(self, i: int) -> None:
        """add(i, -1) (replica i finished a request: once per request), without add's cases for a rise."""
        counts, buckets = self.counts, self._buckets
        old = counts[i]
        new = counts[i] = old - 1
        bucket = buckets[old]
        del bucket[bisect_left(bucket, i)]
        if not bucket:
            del buckets[old]
        target = buckets.get(new)
        if target is None:
            buckets[new] = [i]
        else:
            insort(target, i)
        if new < self._least:  # noqa: PLR1730 - min() is a slow call in CPython 3.11
            self._least = new

    def take(self) -> int:
        """choose() with nothing tried, and count the request on the replica chosen (the common case, in one
        call: add(i, 1) with i's place in the least bucket known)."""
        buckets, least = self._buckets, self._least
        tied = buckets[least]
        pos = next(self._tie) % len(tied)
        i = tied[pos]
        del tied[pos]
        self.counts[i] = least + 1
        target = buckets.get(least + 1)
        if target is None:
            buckets[least + 1] = [i]
        else:
            insort(target, i)
        if not tied:
            del buckets[least]
            self._least = least + 1
        return i

    def choose(self, tried: tuple[int, ...] = ()) -> int | None:
        """The replica (not in tried) with the fewest outstanding requests, ties round robin in index order;
        None when every replica was tried."""
        if not tried:
            tied = self._buckets[self._least]
        else:
            tied = []
            for count in sorted(self._buckets):
                tied = [i for i in self._buckets[count] if i not in tried]
                if tied:
                    break
            if not tied:
                return None
        return tied[next(self._tie) % len(tied)]
