"""The physical limit a decode step cannot beat: weight bytes / measured copy bandwidth."""

from __future__ import annotations

import torch


def measure_copy_bandwidth(device: str = "cuda", nbytes: int = 2 * 1024**3, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write (as vLLM's peer does)."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    bw = 2 * nbytes * iters / (start.elapsed_time(end) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return bw

