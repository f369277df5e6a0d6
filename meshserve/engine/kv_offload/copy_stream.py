"""Where KV offload copies run: a dedicated CUDA copy stream with events, or synchronously on a CPU.

The transfer engine talks to one of these only, so a test can put a stream of its own in (a slow store whose
event fires when the test says). An event answers query() (done? raises if its copies failed) and
synchronize(); `stream` names the stream it was recorded on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class CopyEvent:
    """A point on the copy stream (event None: already passed, the copies ran synchronously)."""

    event: Any = None
    stream: Any = None

    def query(self) -> bool:
        return self.event is None or self.event.query()

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()


@dataclass
class FailedCopy:
    """The event of copies that raised: query() re-raises, so whoever waits on them learns it."""

    error: BaseException
    stream: Any = None

    def query(self) -> bool:
        raise self.error

    def synchronize(self) -> None:
        raise self.error


class SyncCopyStream:
    """The plain path (CPU, or a test's base): every copy has finished when it returns."""

    def after_compute(self) -> None:
        """Later copies start after the compute work queued so far (nothing to order here)."""

    def active(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def record(self, timing: bool = False) -> CopyEvent:
        return CopyEvent()

    def compute_waits(self, event: CopyEvent) -> None:
        """The compute stream's next work starts after event (synchronous: it has)."""


class CudaCopyStream:
    """A side stream of the KV pool's device: copies overlap the forward, ordered by events only."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def after_compute(self) -> None:
        # the compute work queued so far is the last writer of a block stored now and the last reader of a
        # block loaded into: wait for that, never for the forward queued after this call
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def active(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.stream)

    def record(self, timing: bool = False) -> CopyEvent:
        event = torch.cuda.Event(enable_timing=timing)
        event.record(self.stream)
        return CopyEvent(event, self.stream)

    def compute_waits(self, event: CopyEvent) -> None:
        if event.event is not None:
            torch.cuda.current_stream(self.device).wait_event(event.event)
