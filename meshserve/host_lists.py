"""Small host lists (ids, indices, per-row scalars) on the device without waiting for the queued work."""

from __future__ import annotations

import struct

import torch


def to_device(data: list, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """data as a tensor on device: a plain torch.tensor(..., device="cuda") is a pageable copy that synchronizes
    the stream (a speculative verify would wait for the forward it follows; the ipc connector's reads for the
    previous layer's); from pinned memory it is queued on the current stream, ordered before what follows."""
    t = int64_ids(data) if dtype == torch.int64 else None
    if t is None:
        t = torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def int64_ids(data: list) -> torch.Tensor | None:
    """A flat list of ints as an int64 tensor (CPU) through struct.pack: 4-8x faster than torch.tensor on a list (9
    vs 73 us for 1,024 ids on the CPU machine, 2x array('q'); a KV read's block ids); None for anything else."""
    if not data or type(data[0]) is not int:
        return None
    try:
        return torch.frombuffer(bytearray(struct.pack(f"{len(data)}q", *data)), dtype=torch.int64)
    except struct.error:  # (not all ints, or out of range)
        return None


def pack_int64_ids(data: list, out: torch.Tensor) -> None:
    """A flat list of ints written into the front of out (a contiguous int64 CPU tensor, e.g. a pinned buffer) in one
    struct.pack_into: no tensor in between."""
    struct.pack_into(f"{len(data)}q", out.numpy(), 0, *data)
