"""The disk tier's read throughput, estimated online from the restores' real reads.

A restore from disk pays only when reading the blocks takes less time than recomputing their tokens; the
manager asks this estimate how long a read of n bytes will take. It starts from a conservative seed (a slow
disk: until reads were measured, restores from disk are rare) and each measured batch of reads moves it: the
first measurement replaces the seed, later ones are averaged in (exponentially, recent reads weigh most: the
page cache and other traffic change the disk's speed over time). Reader threads report; the engine thread asks.
"""

from __future__ import annotations

import threading

# 1 GB/s: below any NVMe drive with parallel reads, about one SATA SSD. A disk slower than this stays unused.
SEED_BYTES_PER_S = 1e9
WEIGHT = 0.25  # of each new measurement once one was made


class ReadRate:
    """Bytes per second a batch of block reads achieves (its bytes over the wall time its readers took)."""

    def __init__(self, seed_bytes_per_s: float = SEED_BYTES_PER_S, weight: float = WEIGHT):
        if seed_bytes_per_s <= 0 or not 0 < weight <= 1:
            raise ValueError("the seed must be > 0 and the weight in (0, 1]")
        self.bytes_per_s = seed_bytes_per_s
        self.weight = weight
        self.num_measured = 0  # batches measured (0: still the seed)
        self._lock = threading.Lock()

    def update(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        rate = nbytes / seconds
        with self._lock:
            self.bytes_per_s = rate if self.num_measured == 0 else (
                (1 - self.weight) * self.bytes_per_s + self.weight * rate)
            self.num_measured += 1

    def predict_s(self, nbytes: int) -> float:
        """Predicted wall time to read nbytes with the reader threads."""
        return nbytes / self.bytes_per_s
