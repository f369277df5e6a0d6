"""The disk tier's read throughput, estimated online from real reads of its files.

A restore from disk pays only when reading the blocks takes less time than recomputing their tokens; the
manager asks this estimate how long a read of n bytes will take. It starts from a conservative seed (a slow
disk: until reads were measured, restores from disk are rare) and each measured batch of reads moves it: the
estimate is the decayed sum of the bytes read over that of the seconds taken, so the first measurement replaces
the seed, a large restore weighs more than a small probe, and recent reads more than old ones (the page cache
and other traffic change the disk's speed). Reader threads report; the engine thread asks.
"""

from __future__ import annotations

import threading

# 1 GB/s: below any NVMe drive with parallel reads, about one SATA SSD. A disk slower than this stays unused.
SEED_BYTES_PER_S = 1e9
DECAY = 0.5  # of the sums at each new batch


class ReadRate:
    """Bytes per second batches of block reads achieve (their bytes over the wall time their readers took)."""

    def __init__(self, seed_bytes_per_s: float = SEED_BYTES_PER_S, decay: float = DECAY):
        if seed_bytes_per_s <= 0 or not 0 <= decay < 1:
            raise ValueError("the seed must be > 0 and the decay in [0, 1)")
        self.bytes_per_s = seed_bytes_per_s
        self.decay = decay
        self.num_measured = 0  # batches measured (0: still the seed)
        self.total_s = 0.0  # their wall time in all (the disk's share of restore latency, for the metrics)
        self._bytes = 0.0
        self._seconds = 0.0
        self._lock = threading.Lock()

    def update(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        with self._lock:
            self._bytes = self.decay * self._bytes + nbytes
            self._seconds = self.decay * self._seconds + seconds
            self.bytes_per_s = self._bytes / self._seconds
            self.num_measured += 1
            self.total_s += seconds

    def predict_s(self, nbytes: int) -> float:
        """Predicted wall time to read nbytes with the reader threads."""
        return nbytes / self.bytes_per_s
