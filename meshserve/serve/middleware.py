"""Pure-ASGI gates in front of the app: body size, API key, draining, in-flight counting (and, with
--enable-request-id-headers, the X-Request-Id response header).

They answer with OpenAI's error JSON themselves, before FastAPI parses anything, so an oversize or
unauthenticated body is never read past the limit.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from starlette._utils import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshserve.errors import (
    AuthenticationError,
    InvalidArgumentError,
    RequestTooLargeError,
    ServerDrainingError,
)
from meshserve.serve.config import ServeConfig
from meshserve.serve.errors import error_payload
from meshserve.serve.frontend_load import ARRIVAL

# Paths that stay open without an API key and while draining (probes and scrapers must see the state).
_OPEN_PATHS = ("/health", "/ping", "/ready", "/metrics", "/version", "/openapi.json", "/docs", "/redoc")
# Paths gated like /v1 (API key, drain, in-flight count): SageMaker's /invocations serves /v1's chat and completions
_GUARDED_PREFIXES = ("/v1", "/invocations")
_GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/invocations")


# A \uD800-\uDFFF escape: JSON allows it alone, but a lone surrogate is not Unicode text (it cannot be encoded as
# UTF-8), so every tokenizer, regex compiler and JSON response that meets it fails. Only bodies with one are parsed.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def lone_surrogate_error(body: bytes) -> InvalidArgumentError | None:
    """A 400 for a JSON body holding a string with a lone UTF-16 surrogate (a pair, e.g. an escaped emoji, is
    fine); None otherwise, and for a body that is not JSON (the app reports that)."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        if not _has_lone_surrogate(json.loads(body)):
            return None
    except (ValueError, RecursionError):
        return None
    return InvalidArgumentError("the request body holds a string with a lone UTF-16 surrogate escape "
                                "(\\ud800-\\udfff not part of a pair): not valid Unicode text")


@dataclass
class ServerState:
    """Lifecycle of one server: ready once the engine is loaded, draining after SIGTERM."""

    ready: bool = True
    draining: bool = False
    num_in_flight: int = 0  # /v1 requests being answered (streams included)

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """One request counted in num_in_flight while answered, to its last byte (what a drain waits on)."""
        self.num_in_flight += 1
        try:
            yield
        finally:
            self.num_in_flight -= 1


async def send_error(send: Send, exc: Exception) -> None:
    status, body, headers = error_payload(exc)
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw, "more_body": False})


class GateMiddleware:
    """Body limit, API key check (constant-time), drain refusal, in-flight accounting; arrival time stamped
    first thing, and (with admission) generation requests the front end itself cannot serve in time get their
    429 before their body is read."""

    def __init__(self, app: ASGIApp, config: ServeConfig, state: ServerState,
                 admission: Callable[[], Exception | None] | None = None,
                 on_reject: Callable[[Exception], None] | None = None, on_request: Callable[[], None] | None = None):
        self.app = app
        self.config = config
        self.state = state
        self.admission = admission
        self.on_reject = on_reject
        self.on_request = on_request
        keys = [config.api_key] if isinstance(config.api_key, str) else (config.api_key or [])
        self._api_keys = [k.encode() for k in keys if k]

    def _authorized(self, scope: Scope) -> bool:
        if not self._api_keys:
            return True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer":
            token = headers.get(b"x-api-key", b"")
        token = token.strip()
        matches = [secrets.compare_digest(token, key) for key in self._api_keys]  # each compared: no early exit
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ARRIVAL.set(time.monotonic())
        path = get_route_path(scope)  # under --root-path, the path the routes see (an unstripped prefix too)
        guarded = path.startswith(_GUARDED_PREFIXES) and not path.startswith(_OPEN_PATHS)
        if self.on_request is not None:
            self.on_request()
        if guarded and not self._authorized(scope):
            await send_error(send, AuthenticationError("missing or invalid API key"))
            return
        if guarded and self.state.draining:
            await send_error(send, ServerDrainingError("the server is shutting down",
                                                       retry_after_s=self.config.retry_after_s))
            return
        receive, body = await self._limited_body(scope, receive, send)
        if receive is None:
            return
        if (bad_text := lone_surrogate_error(body)) is not None:
            await send_error(send, bad_text)
            return
        # the server's target, unless the request names its own (then its handler decides, after parsing)
        if guarded and self.admission is not None and path in _GENERATION_PATHS and b'"slo"' not in body:
            refusal = self.admission()
            if refusal is not None:
                if self.on_reject is not None:
                    self.on_reject(refusal)
                await send_error(send, refusal)
                return
        if not guarded:
            await self.app(scope, receive, send)
            return
        with self.state.in_flight():
            await self.app(scope, receive, send)

    async def _limited_body(self, scope: Scope, receive: Receive, send: Send) -> tuple[Receive | None, bytes]:
        """Read the whole body up to the limit and replay it (and the body); None once a 413 was sent."""
        limit = self.config.max_request_body_bytes
        too_large = RequestTooLargeError(f"the request body exceeds {limit} bytes")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_error(send, too_large)
            return None, b""
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return receive, b""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client gone before the body arrived
                return _replay([message], receive), b""
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await send_error(send, too_large)
                return None, b""
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        return _replay([{"type": "http.request", "body": body, "more_body": False}], receive), body


class RequestIdHeaderMiddleware:
    """--enable-request-id-headers (vLLM's XRequestIdMiddleware): every HTTP response carries an X-Request-Id
    header, the request's own when it sent one, else a fresh uuid4 hex (not the body's id: vLLM draws its own)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope.get("headers") or [] if k.lower() == b"x-request-id"), None)
        request_id = sent if sent is not None else uuid.uuid4().hex.encode()

        async def send_with_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_request_id)


class RootPathMiddleware:
    """--root-path: the prefix a proxy serves the app under, set as the scope's root_path (what FastAPI's
    deprecated root_path argument did): routes match with the prefix or without it, OpenAPI lists it."""

    def __init__(self, app: ASGIApp, root_path: str):
        self.app = app
        self.root_path = root_path.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "root_path": self.root_path}
        await self.app(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
