"""Pure-ASGI gates in front of the app: body size, API key, draining, in-flight counting.

They answer with OpenAI's error JSON themselves, before FastAPI parses anything, so an oversize or
unauthenticated body is never read past the limit.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshserve.errors import AuthenticationError, RequestTooLargeError, ServerDrainingError
from meshserve.serve.config import ServeConfig
from meshserve.serve.errors import error_payload

# Paths that stay open without an API key and while draining (probes and scrapers must see the state).
_OPEN_PATHS = ("/health", "/ready", "/metrics", "/version", "/openapi.json", "/docs", "/redoc")


@dataclass
class ServerState:
    """Lifecycle of one server: ready once the engine is loaded, draining after SIGTERM."""

    ready: bool = True
    draining: bool = False
    num_in_flight: int = 0  # /v1 requests being answered (streams included)


async def send_error(send: Send, exc: Exception) -> None:
    status, body, headers = error_payload(exc)
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw, "more_body": False})


class GateMiddleware:
    """Body limit, API key check (constant-time), drain refusal and in-flight accounting."""

    def __init__(self, app: ASGIApp, config: ServeConfig, state: ServerState):
        self.app = app
        self.config = config
        self.state = state
        self._api_key = config.api_key.encode() if config.api_key else None

    def _authorized(self, scope: Scope) -> bool:
        if self._api_key is None:
            return True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer":
            token = headers.get(b"x-api-key", b"")
        return secrets.compare_digest(token.strip(), self._api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        guarded = path.startswith("/v1") and not path.startswith(_OPEN_PATHS)
        if guarded and not self._authorized(scope):
            await send_error(send, AuthenticationError("missing or invalid API key"))
            return
        if guarded and self.state.draining:
            await send_error(send, ServerDrainingError("the server is shutting down",
                                                       retry_after_s=self.config.retry_after_s))
            return
        receive = await self._limited_body(scope, receive, send)
        if receive is None:
            return
        if not guarded:
            await self.app(scope, receive, send)
            return
        self.state.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.num_in_flight -= 1

    async def _limited_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the whole body up to the limit and replay it; None once a 413 was sent."""
        limit = self.config.max_request_body_bytes
        too_large = RequestTooLargeError(f"the request body exceeds {limit} bytes")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_error(send, too_large)
            return None
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return receive
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client gone before the body arrived
                return _replay([message], receive)
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await send_error(send, too_large)
                return None
            chunks.append(body)
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
