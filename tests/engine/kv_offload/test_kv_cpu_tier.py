"""CPUTier: LRU by hash, slots that pending ops name are never evicted or written by the host."""

from __future__ import annotations

import pytest
import torch

from meshserve.engine.kv_offload.cpu_tier import CPUTier


def tier(n: int) -> CPUTier:
    return CPUTier(n, (2, 2, 4, 1, 2), torch.float32, pin_memory=False)


def test_free_slots_first_then_least_recently_used():
    t = tier(3)
    evicted = []
    t.on_evict = lambda h, s: evicted.append((h, s))
    for i in range(3):
        slot = t.allocate()
        t.insert(bytes([i]), slot)
    assert t.lookup(bytes([0])) is not None  # touch 0: 1 is now the oldest
    slot = t.allocate()
    assert evicted == [(bytes([1]), slot)]
    assert bytes([1]) not in t and len(t) == 2


def test_pending_slots_are_kept_from_eviction_and_host_writes():
    t = tier(2)
    a, b = t.allocate(), t.allocate()
    t.insert(b"a", a)
    t.insert(b"b", b)
    t.pending.update({a, b})
    assert t.allocate() is None  # every cached slot is named by an op not launched yet
    t.pending.discard(b)
    assert t.allocate() == b
    t.release(b)
    t.pending.add(b)
    assert t.allocate(host_write=True) is None  # free but pending: a device op still reads it
    assert t.allocate(host_write=False) == b  # a device store is ordered after it on the stream


def test_slot_bytes_round_trip():
    t = tier(2)
    data = bytes((i * 13) % 256 for i in range(t.block_bytes))
    t.write_slot(1, data)
    assert t.slot_bytes(1).tobytes() == data


def test_needs_a_slot():
    with pytest.raises(ValueError):
        tier(0)
