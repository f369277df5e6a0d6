"""Counters of KV transfers, published with the core's SchedulerStats and rendered in /metrics."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# per-transfer latency buckets (seconds), Prometheus style
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class KVTransferStats:
    """Since start: transfers, bytes and seconds by direction, failures, and the blocks held now."""

    sent: int = 0
    sent_bytes: int = 0
    received: int = 0
    received_bytes: int = 0
    received_s: float = 0.0  # wall time of the receiving pulls (handshake + every layer + scatter)
    failed: int = 0  # pulls that did not complete (their blocks were freed, or retired: BlockManager.retire)
    expired: int = 0  # held blocks freed because nobody pulled or acknowledged them in time
    held_blocks: int = 0  # producer: blocks kept for consumers now
    receiving_blocks: int = 0  # consumer: blocks allocated to pulls in flight now
    # producer, layer-wise: transfers streamed, and the seconds from each one's first send to its last send's
    # end, and how many of them fell before its prefill ended (the transfer overlapping compute)
    streamed: int = 0
    streamed_s: float = 0.0
    streamed_overlap_s: float = 0.0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))

    def observe_received(self, nbytes: int, seconds: float) -> None:
        self.received += 1
        self.received_bytes += nbytes
        self.received_s += seconds
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def observe_streamed(self, seconds: float, overlap_s: float) -> None:
        self.streamed += 1
        self.streamed_s += seconds
        self.streamed_overlap_s += overlap_s

    def as_dict(self) -> dict:
        """SchedulerStats' kv_transfer_* fields."""
        return {f"kv_transfer_{k}": (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}
