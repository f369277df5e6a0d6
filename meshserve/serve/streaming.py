"""Server-sent events and client-disconnect handling.

A streaming response ends with `data: [DONE]`. An error after the headers went out is sent as one
`data: {"error": ...}` event (the status line cannot change any more). A client that goes away cancels
its handler: before streaming through `cancel_on_disconnect`, while streaming through Starlette, which
cancels the body iterator; either way the engine request is closed and so aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from meshserve.serve.errors import error_payload

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"

# Characters JSON may carry raw that many line readers treat as line breaks (Python's str.splitlines, so
# httpx's aiter_lines): escaped, so an event never splits inside a client that reads the stream by lines.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}
_HAS_LINE_BREAK = re.compile("[\u0085\u2028\u2029]")


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    else:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    if _HAS_LINE_BREAK.search(data):
        data = data.translate(_LINE_BREAKS)
    return f"data: {data}\n\n"


def sse_error(exc: BaseException) -> str:
    _, body, _ = error_payload(exc)
    return sse_event(body)


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its body iterator, even when cancelled."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run the handler's work; cancel it if the client disconnects first (that aborts its requests)."""
    handler = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({handler, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        handler.cancel()
        raise
    finally:
        listener.cancel()
    if handler.done():
        return handler.result()
    handler.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        # a handler may still finish (Python 3.11's asyncio.wait_for swallows a cancel that meets its result):
        # its response runs anyway, to no one, so what it holds is let go (a relayed stream's replica)
        await _discard(request.scope, await handler)
    logger.debug("client disconnected before the response; request aborted")
    return Response(status_code=499)  # never seen by anyone: the client is gone


async def _discard(scope: Scope, response: Response) -> None:
    """Run a response whose client is gone, as uvicorn would: each send fails, receive says disconnect."""
    async def gone() -> dict:
        return {"type": "http.disconnect"}

    async def refuse(message: dict) -> None:
        raise OSError("the client is gone")

    with contextlib.suppress(Exception):
        await response(scope, gone, refuse)
