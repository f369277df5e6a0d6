"""The scheduler's waiting queue: first come first served, or by (priority, arrival)."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator

from meshserve.engine.sequence import Sequence


class WaitingQueue:
    """Sequences waiting to run. FCFS: arrival order, preempted sequences back at the front. Priority: ordered
    by (priority, arrival time), so a preempted sequence goes back ahead of later arrivals of its priority."""

    def __init__(self, by_priority: bool = False):
        self.by_priority = by_priority
        self._fifo: deque[Sequence] = deque()
        self._sorted: list[Sequence] = []
        self._keys: list[tuple[int, float, int]] = []
        self._counter = 0

    def _key(self, seq: Sequence) -> tuple[int, float, int]:
        self._counter += 1
        return (seq.priority, seq.arrival_time, self._counter)

    def append(self, seq: Sequence) -> None:
        """A new arrival."""
        if not self.by_priority:
            self._fifo.append(seq)
            return
        key = self._key(seq)
        i = bisect.bisect(self._keys, key)
        self._keys.insert(i, key)
        self._sorted.insert(i, seq)

    def appendleft(self, seq: Sequence) -> None:
        """A preempted sequence, to run again before the sequences it was admitted before."""
        if self.by_priority:
            self.append(seq)
        else:
            self._fifo.appendleft(seq)

    def popleft(self) -> Sequence:
        if not self.by_priority:
            return self._fifo.popleft()
        self._keys.pop(0)
        return self._sorted.pop(0)

    def remove(self, seq: Sequence) -> None:
        """Raises ValueError when seq is not queued."""
        if not self.by_priority:
            self._fifo.remove(seq)
            return
        i = self._sorted.index(seq)
        del self._sorted[i], self._keys[i]

    def __getitem__(self, i: int) -> Sequence:
        return self._sorted[i] if self.by_priority else self._fifo[i]

    def __len__(self) -> int:
        return len(self._sorted) if self.by_priority else len(self._fifo)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._sorted if self.by_priority else self._fifo)
