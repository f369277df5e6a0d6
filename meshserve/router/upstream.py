"""The router's calls to replicas: keep-alive HTTP/1.1 connections, the response body relayed as raw bytes.

The relay is the router's hot path: W3 streams ~13,500 chunks/s through it. httpx costs ~100 us of Python per
chunk on the way in (anyio streams, h11's pure-Python chunked parser, the decoder chain) and its connection
pool scans every pooled connection on each request and each response close (quadratic in the streams in
flight). `FastUpstream` reads with httptools' C parser straight off an asyncio protocol, one pooled connection
per request in flight, reused while the replica keeps it alive: a few us per chunk, constant per request.
`HttpxUpstream` is the plain path (no httptools installed); both raise httpx's exception types, which the
proxy's retry and ejection rules are written in.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar
from urllib.parse import urlsplit

import httpx

try:
    import httptools
except ImportError:  # the plain path
    httptools = None

T = TypeVar("T")
_PAUSE_BYTES = 1 << 18  # a client slower than its replica: stop reading the replica past this much buffered


class Aborted(httpx.ReadError):
    """A call failed by abort_all (the router's drain ran out of time), not by its replica."""


class HttpxUpstream:
    """The plain path: httpx's client (streamed responses). httpx cannot fail a call from outside, so the wait for
    a response's head races abort_all's future (the call lost is cancelled, which closes its connection: the
    replica sees the abort), and a body is read by a pump task into a queue that abort_all can end
    (AbortableResponse: no task per chunk)."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self._abort: asyncio.Future | None = None  # abort_all's exception, as the future's result
        self._open: set[AbortableResponse] = set()  # bodies being read

    def _abort_future(self) -> asyncio.Future:
        if self._abort is None:  # made on first use: the event loop is the app's
            self._abort = asyncio.get_running_loop().create_future()
        return self._abort

    def _aborted(self) -> Exception | None:
        """abort_all's exception, a fresh instance (a shared one would pile up every raise's traceback)."""
        if self._abort is None or not self._abort.done():
            return None
        exc = self._abort.result()
        return type(exc)(*exc.args)

    async def unless_aborted(self, work: Awaitable[T]) -> T:
        """work's result, or abort_all's exception raised as soon as it is called (work cancelled)."""
        abort = self._abort_future()
        task = asyncio.ensure_future(work)
        try:
            if not abort.done():
                await asyncio.wait((task, abort), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():  # aborted, or the caller was cancelled (its client went away)
                task.cancel()
                await asyncio.wait((task,))
        if abort.done() and (task.cancelled() or task.exception() is not None):
            raise self._aborted()
        return task.result()  # it finished first (or raced the abort and won)

    async def send(self, method: str, url: str, body: bytes | None, headers: list[tuple[str, str]],
                   timeout: httpx.Timeout) -> AbortableResponse:
        request = self.client.build_request(method, url, content=body, headers=headers, timeout=timeout)
        return AbortableResponse(self, await self.unless_aborted(self.client.send(request, stream=True)))

    def abort_all(self, exc: Exception) -> None:
        """Fail every call in flight, and every later one, with exc."""
        abort = self._abort_future()
        if not abort.done():
            abort.set_result(exc)
        for resp in list(self._open):
            resp.abort()

    async def aclose(self) -> None:
        pass  # the client is the app's, closed with it


class AbortableResponse:
    """An httpx response whose body a pump task reads into a small queue (the proxy's reads: status, headers,
    body); abort() cancels the pump and ends the reader's wait with abort_all's exception once the chunks
    already queued are read."""

    _QUEUED_CHUNKS = 8  # read-ahead of the pump: a slow client stops the replica's reads past this

    def __init__(self, upstream: HttpxUpstream, resp: httpx.Response):
        self._upstream = upstream
        self._resp = resp
        self.status_code = resp.status_code
        self.headers = resp.headers
        self._chunks: asyncio.Queue = asyncio.Queue(self._QUEUED_CHUNKS)
        self._pump: asyncio.Task | None = None

    async def _pump_body(self) -> None:
        try:
            async for chunk in self._resp.aiter_bytes():
                await self._chunks.put(chunk)
            await self._chunks.put(None)  # the end
        except Exception as e:  # noqa: BLE001  (handed to the reader)
            await self._chunks.put(e)

    def abort(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        if not self._chunks.full():  # a reader waiting on an empty queue wakes; a full one finds it drained
            self._chunks.put_nowait(self._upstream._aborted())

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        if (exc := self._upstream._aborted()) is not None:
            raise exc
        self._upstream._open.add(self)
        self._pump = asyncio.ensure_future(self._pump_body())
        try:
            while True:
                if self._chunks.empty() and (exc := self._upstream._aborted()) is not None:
                    raise exc
                item = await self._chunks.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._upstream._open.discard(self)
            self._pump.cancel()
            await asyncio.wait((self._pump,))
            await self._resp.aclose()

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_bytes()])

    async def aclose(self) -> None:
        await self._resp.aclose()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a replica, parsing responses with httptools."""

    def __init__(self, key: tuple[str, int]):
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.keep_alive = False
        self.complete = False
        self.error: Exception | None = None
        self.body = bytearray()
        self.waiter: asyncio.Future | None = None
        self.paused = False

    # -- asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(httpx.RemoteProtocolError(f"malformed response from the replica: {e}"))
            self.transport.close()
            return
        self._wake()  # once per read, whatever the parser found in it
        if len(self.body) > _PAUSE_BYTES and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(httpx.ReadError(f"the replica closed the connection ({exc!r})") if exc else
                       httpx.RemoteProtocolError("the replica closed the connection mid-response"))

    # -- httptools callbacks ---------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the message is complete

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True

    # -- the response's side ---------------------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout_s: float, what: type[httpx.TimeoutException]) -> None:
        """Until the parser has news (head, body, end) or the connection failed; raises on timeout."""
        loop = asyncio.get_running_loop()
        self.timed_out = False
        self.waiter = loop.create_future()
        timer = loop.call_later(timeout_s, self._timed_out, self.waiter)
        try:
            await self.waiter
        finally:
            timer.cancel()
            self.waiter = None
        if self.timed_out:
            raise what(f"the replica sent nothing for {timeout_s:g} s")

    timed_out = False

    def _timed_out(self, waiter: asyncio.Future) -> None:
        if not waiter.done():
            self.timed_out = True
            waiter.set_result(None)

    def take_body(self) -> bytes:
        data = bytes(self.body)
        self.body.clear()
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and self.error is None and not self.closed

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class FastResponse:
    """A replica's response as the proxy reads it: status, headers, then the body as it arrives."""

    def __init__(self, upstream: FastUpstream, conn: _Connection, read_timeout_s: float):
        self._upstream = upstream
        self._conn = conn
        self._read_timeout_s = read_timeout_s
        self.status_code = conn.parser.get_status_code()
        self.headers = httpx.Headers(conn.headers)
        self._released = False

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's bytes as they come (everything that arrived since the last read, in one piece)."""
        conn = self._conn
        while True:
            if conn.body:
                yield conn.take_body()
                continue
            if conn.complete:
                return
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._read_timeout_s, httpx.ReadTimeout)

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_bytes()])

    async def aclose(self) -> None:
        """Back to the pool if the response was read to its end, else closed (the replica sees the abort)."""
        if self._released:
            return
        self._released = True
        self._upstream.release(self._conn)


class FastUpstream:
    """Keep-alive connections to the replicas (a LIFO of idle ones per host), httptools parsing."""

    def __init__(self, keepalive_expiry_s: float, max_idle_per_host: int = 1024,
                 tls: HttpxUpstream | None = None):
        self.keepalive_expiry_s = keepalive_expiry_s
        self.tls = tls  # https:// replicas go through httpx
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int], collections.deque[_Connection]] = {}
        self._busy: set[_Connection] = set()  # connections with a request in flight (abort_all)
        self._aborted: Exception | None = None  # abort_all's exception: later sends fail with it

    async def _connect(self, key: tuple[str, int], timeout_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            connecting = loop.create_connection(lambda: _Connection(key), *key)
            _, conn = await asyncio.wait_for(connecting, timeout_s)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {key[0]}:{key[1]} took over {timeout_s:g} s") from None
        except OSError as e:
            raise httpx.ConnectError(f"cannot connect to {key[0]}:{key[1]}: {e}") from None
        return conn

    def _pooled(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closing
            if not conn.closed and now - conn.idle_since < self.keepalive_expiry_s:
                return conn
            conn.close()
        return None

    def release(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        idle = self._idle.setdefault(conn.key, collections.deque())
        if conn.reusable() and len(idle) < self.max_idle_per_host:
            conn.parser = httptools.HttpResponseParser(conn)
            conn._reset()
            conn.idle_since = time.monotonic()
            idle.append(conn)
        else:
            conn.close()

    async def send(self, method: str, url: str, body: bytes | None, headers: list[tuple[str, str]],
                   timeout: httpx.Timeout) -> FastResponse | AbortableResponse:
        if self._aborted is not None:  # abort_all ran: what comes after fails too
            raise type(self._aborted)(*self._aborted.args)
        parts = urlsplit(url)
        if parts.scheme != "http" and self.tls is not None:  # TLS to replicas: the plain path's business
            return await self.tls.send(method, url, body, headers, timeout)
        if parts.scheme != "http":
            raise httpx.UnsupportedProtocol(f"FastUpstream speaks plain http, not {parts.scheme}")
        key = (parts.hostname or "127.0.0.1", parts.port or 80)
        conn = self._pooled(key) or await self._connect(key, timeout.connect or 5.0)
        self._busy.add(conn)
        target = parts.path + ("?" + parts.query if parts.query else "")
        head = [f"{method} {target} HTTP/1.1\r\nhost: {parts.netloc}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers]
        head.append(f"content-length: {len(body or b'')}\r\n\r\n" if method != "GET" or body else "\r\n")
        conn.transport.write("".join(head).encode("latin-1") + (body or b""))
        try:
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(timeout.read or 120.0, httpx.ReadTimeout)
        except BaseException:
            self._busy.discard(conn)
            conn.close()
            raise
        return FastResponse(self, conn, timeout.read or 120.0)

    def abort_all(self, exc: Exception) -> None:
        """Fail every request in flight, and every later one, with exc, its connection closed (the replica
        sees the abort): waits for a head or a body end at once, a body's bytes already here still read
        first."""
        self._aborted = exc
        for conn in list(self._busy):
            conn._fail(exc)
            conn.close()
        if self.tls is not None:  # the https replicas' calls
            self.tls.abort_all(exc)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


def make_upstream(client: httpx.AsyncClient, keepalive_expiry_s: float) -> FastUpstream | HttpxUpstream:
    plain = HttpxUpstream(client)
    return FastUpstream(keepalive_expiry_s, tls=plain) if httptools is not None else plain
