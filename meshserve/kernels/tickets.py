"""Tickets: the int32 counters with which the programs of a Triton launch find the last of them to finish a shared
piece of work (decode attention's inline reduce and the balanced kernel's merge, kernels/triton_attention.py and
triton_decode_balanced.py; the decode GEMM's split-K, triton_decode_gemm.py). The last arriver does the work and
sets its counter back to zero, so the buffer is zero between launches. One buffer per device serves them all:
launches on a device do not overlap in their ticket use (one stream, as the engine runs; graphs replay in order;
under PDL a launch touches tickets only after it waited for its producer)."""

from __future__ import annotations

import torch

MAX_TICKETS = 1 << 16
_buffers: dict[torch.device, torch.Tensor] = {}


def ticket_workspace(device: torch.device) -> torch.Tensor:
    """int32 [MAX_TICKETS] on device, zero between launches. Made by its first user, which must not be inside a
    CUDA-graph capture (tickets_usable): the engine's eager warm-ups run before any capture."""
    tickets = _buffers.get(device)
    if tickets is None:
        tickets = _buffers[device] = torch.zeros(MAX_TICKETS, dtype=torch.int32, device=device)
    return tickets


def tickets_usable(device: torch.device) -> bool:
    """Whether a launch may take tickets now: the buffer exists, or it can be made (not while a CUDA graph is
    captured: the allocation would belong to that graph's pool). Where not, callers take their ticketless path."""
    return device.type != "cuda" or device in _buffers or not torch.cuda.is_current_stream_capturing()
