"""Small host lists (ids, indices, per-row scalars) on the device without waiting for the queued work."""

from __future__ import annotations

import torch


def to_device(data: list, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """data as a tensor on device: a plain torch.tensor(..., device="cuda") is a pageable copy that synchronizes
    the stream (a speculative verify would wait for the forward it follows; the ipc connector's reads for the
    previous layer's); from pinned memory it is queued on the current stream, ordered before what follows."""
    t = torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
