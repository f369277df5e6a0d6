"""What both async engine clients share: one asyncio queue per request, fed from a non-asyncio thread."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from meshserve.outputs import RequestOutput
from meshserve.sampling import SamplingParams


class OutputStreams:
    """Routes each RequestOutput (or an exception) to the asyncio queue of its request.

    Subclasses say how a request starts (`_start`, awaited: raises the engine's validation errors) and how
    an unfinished one is dropped (`_abort_nowait`, when the caller leaves early)."""

    def __init__(self) -> None:
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}

    @property
    def is_running(self) -> bool:
        raise NotImplementedError

    async def _start(self, request_id: str, prompt: Any, params: SamplingParams | None) -> None:
        raise NotImplementedError

    def _abort_nowait(self, request_id: str) -> None:
        raise NotImplementedError

    def _deliver(self, request_id: str, item: Any) -> None:
        """Thread-safe: hand an output or an exception to the request's consumer."""
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    async def generate(self, prompt: Any, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after every step that changed it, the last one finished.
        Leaving the iterator early (client gone, task cancelled) aborts the request."""
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            await self._start(request_id, prompt, params)
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.is_running:
                self._abort_nowait(request_id)
