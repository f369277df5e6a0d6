"""Forwarding one request: pick a replica, retry what failed before its first byte, stream through.

An attempt is *committed* once something is about to reach the client: the whole body of a non-streamed
response, or the first complete server-sent event of a stream. Before that, a connection error, a
timeout, or a 502/503/504/429 from the replica sends the request to another replica (at most
`max_attempts` attempts, none started after `retry_budget_s`). A refused connection costs no attempt: it
reached no replica and ejects that one at once, so when several replicas die together a request still gets
to a live one (the fallback, say) instead of spending its attempts on the dead; each replica is tried once
per request, so this stays bounded. After that, nothing is retried: a stream
that breaks ends with one clean `data: {"error": ...}` event and `data: [DONE]`, so the client never sees
duplicated or spliced output. Events are relayed whole, as they arrive (those of one upstream chunk in one
send), never buffered past one event.

A request that names a stored Responses-API response goes first to the replica that keeps it
(response_affinity.py); a replica that answers that it keeps no such response costs no attempt, and the next
replica is asked, each once; when none keeps it the client gets the last such answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from meshserve.errors import NoReplicaAvailableError, RouterDrainingError, UpstreamStreamError
from meshserve.router.config import RouterConfig
from meshserve.router.disagg import (
    decode_body,
    decode_params,
    is_transfer_failure,
    new_transfer_id,
    run_prefill,
    wants_disaggregation,
)
from meshserve.router.metrics import RouterMetrics
from meshserve.router.pool import ReplicaPool, Route
from meshserve.router.prefix import parse_body, prefix_key
from meshserve.router.replica import FALLBACK, Replica
from meshserve.router.response_affinity import (
    ResponseOwners,
    body_response_id,
    creates_response,
    event_response_id,
    is_not_found,
    named_response,
)
from meshserve.router.upstream import AbortableResponse, Aborted, FastResponse, FastUpstream, HttpxUpstream
from meshserve.serve.errors import error_payload
from meshserve.serve.responses_stream import TERMINAL_EVENTS
from meshserve.serve.streaming import SSE_DONE, sse_error

logger = logging.getLogger(__name__)

# Hop-by-hop and framing headers are the router's own business on each leg.
_DROP_REQUEST = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te",
                           "upgrade", "proxy-authorization", "proxy-connection", "accept-encoding", "trailer"})
_DROP_RESPONSE = frozenset({"content-length", "connection", "keep-alive", "transfer-encoding",
                            "content-encoding", "date", "server", "trailer", "upgrade"})
# A replica answering these did not start the request: another replica may.
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_EJECT_STATUSES = frozenset({502, 503, 504})  # draining, dead engine, or a broken proxy in front of it

HEADER_REPLICA = "x-meshserve-replica"
HEADER_ATTEMPTS = "x-meshserve-attempts"
HEADER_FALLBACK = "x-meshserve-fallback"
UpstreamResponse = FastResponse | AbortableResponse  # what either upstream's send answers
KV_FAILED = "its KV transfer failed"  # a decode attempt that never got its prefill's KV (retried colocated)


@dataclass
class _Rejected:
    """An attempt that failed before committing; `response` is the replica's own refusal, if any."""

    reason: str
    response: Response | None = None
    refused: bool = False  # the connection was refused: nothing reached the replica
    missing: bool = False  # the replica keeps no response by the id the request names: another may


def forward_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The client's headers as sent on to a replica: API keys (Authorization, X-Api-Key) included."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers
            if k.decode("latin-1").lower() not in _DROP_REQUEST]


def _response_headers(resp: UpstreamResponse, route: Route, attempts: int) -> dict[str, str]:
    out = {k: v for k, v in resp.headers.items() if k.lower() not in _DROP_RESPONSE}
    out[HEADER_REPLICA] = route.replica.name
    out[HEADER_ATTEMPTS] = str(attempts)
    if route.fallback_reason:
        out[HEADER_FALLBACK] = route.fallback_reason
    return out


def _split_events(buffer: bytearray) -> list[bytes]:
    """Remove and return the complete events (each ending in a blank line) at the front of `buffer`."""
    events = []
    while True:
        end = buffer.find(b"\n\n")
        if end < 0:
            return events
        events.append(bytes(buffer[:end + 2]))
        del buffer[:end + 2]


def _take_whole_events(buffer: bytearray) -> bytes:
    """Remove and return the complete events at the front of `buffer`, as one piece (b"" if none)."""
    end = buffer.rfind(b"\n\n")
    if end < 0:
        return b""
    whole = bytes(buffer[:end + 2])
    del buffer[:end + 2]
    return whole


# a stream's last event: [DONE], or for /v1/responses (which sends none) its response's last event
_STREAM_ENDS = (b"data: [DONE]", *(f"event: {kind}\n".encode() for kind in TERMINAL_EVENTS))


def _has_done(events: bytes) -> bool:
    """Whether whole events hold a stream's last event (an event starts the piece or follows a blank line;
    JSON escapes newlines, so no event's data holds a blank line)."""
    return any(events.startswith(end) or b"\n\n" + end in events for end in _STREAM_ENDS)


class _RelayedStream(StreamingResponse):
    """A relayed stream whose release (the replica's count of requests out, its connection) runs however the
    response ends. Starlette cancels a response whose client is already gone before it iterates the body: the
    relay never starts, so its own finally never runs (each such client held an outstanding count and a
    replica connection for good)."""

    def __init__(self, relay: AsyncIterator[bytes], release: Callable[[str], Awaitable[None]], **kwargs):
        super().__init__(relay, **kwargs)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # a relay that started releases in its finally (its outcome)
            await self.release("cancelled")  # one that never started (a no-op after the relay's)


class Proxy:
    """Sends requests to the pool's replicas; one instance per router app."""

    def __init__(self, pool: ReplicaPool, config: RouterConfig, metrics: RouterMetrics,
                 client: httpx.AsyncClient, upstream: FastUpstream | HttpxUpstream | None = None):
        self.pool = pool
        self.config = config
        self.metrics = metrics
        self.client = client
        self.upstream = upstream or HttpxUpstream(client)  # the proxied attempts
        self._prefill_legs: set[asyncio.Task] = set()  # concurrent prefill legs in flight (kept from the GC)
        self.ending = False  # end_in_flight was called: the router's drain ran out of time
        self.owners = ResponseOwners(config.response_affinity_size)  # response id -> the replica keeping it

    def _timeout(self) -> httpx.Timeout:
        c = self.config
        return httpx.Timeout(connect=c.connect_timeout_s, read=c.read_timeout_s, write=c.read_timeout_s,
                             pool=c.connect_timeout_s)

    def _payload(self, raw: bytes, body: dict | None, route: Route) -> bytes:
        if route.fallback_reason and self.config.fallback_model and body is not None and "model" in body:
            return json.dumps({**body, "model": self.config.fallback_model}).encode()
        return raw

    def _prefill_leg_done(self, task: asyncio.Task) -> None:
        self._prefill_legs.discard(task)
        if not task.cancelled() and isinstance(task.exception(), Aborted):
            return  # end_in_flight: its decode leg ends with the drain's 503 or error event
        result = None if task.cancelled() or task.exception() is not None else task.result()
        # run_prefill's decode-leg params (a dict) once an instance holds the KV; None (no instance could) or an
        # instance's refusal (a Response) leave the decode leg's transfer to time out and retry colocated
        if not isinstance(result, dict):
            self.metrics.fallback.labels("prefill_unavailable").inc()
            logger.warning("concurrent prefill leg failed (%s)", task.exception() if not task.cancelled() and
                           task.exception() is not None else getattr(result, "status_code", "no prefill instance"))

    def _route(self, named: str | None, key: int | None, tried: set[str]) -> Route | None:
        """The next attempt's replica: the one keeping the response the request names while it is healthy and
        not tried yet, else the pool's choice (which, attempt after attempt, asks each replica once)."""
        url = self.owners.owner(named) if named is not None else None
        owner = self.pool.find(url) if url is not None else None
        if owner is not None and owner.healthy and owner.url not in tried:
            return Route(owner, "holds_response" if owner.pool == FALLBACK else None)
        return self.pool.route(key, tried)

    async def forward(self, method: str, path: str, raw: bytes, headers: list[tuple[bytes, bytes]],
                      query: str = "") -> Response:
        """Answer one client request through the pool (never raises for upstream trouble)."""
        arrival = time.monotonic()
        body = parse_body(raw) if raw else None
        named = named_response(method, path, body)  # the stored response it needs, if any
        target = f"{path}?{query}" if query else path
        stream = bool(body and body.get("stream") is True)
        c = self.config
        key = prefix_key(body, c.prefix_block_chars, c.prefix_block_tokens, c.prefix_max_blocks)
        fwd_headers = forward_headers(headers)
        tried: set[str] = set()
        refusal: Response | None = None
        missing: Response | None = None  # the last answer that the named response is not kept there
        reasons: list[str] = []
        attempts = 0  # every try, as reported to the client
        spent = 0  # the tries max_attempts bounds: those that reached a replica
        decode_raw = None  # disaggregation: the first decode attempt pulls the KV of a prefill instance
        if self.pool.prefills and wants_disaggregation(path, body) and c.disagg_concurrent:
            # both legs at once: the decode instance waits for the layers as the prefill computes them; a prefill
            # that fails leaves the decode leg's transfer to time out, which is retried colocated below
            transfer_id = new_transfer_id()
            task = asyncio.create_task(run_prefill(self.upstream, self.pool, path, body, key, fwd_headers,
                                                   self._timeout(), c.max_attempts, transfer_id))
            self._prefill_legs.add(task)
            task.add_done_callback(self._prefill_leg_done)
            decode_raw = decode_body(body, decode_params(transfer_id))
        elif self.pool.prefills and wants_disaggregation(path, body):
            try:
                leg = await run_prefill(self.upstream, self.pool, path, body, key, fwd_headers, self._timeout(),
                                        c.max_attempts)
            except Aborted:  # end_in_flight
                return self._drain_timed_out()
            if isinstance(leg, Response):  # the prefill instance found the request invalid
                self.metrics.count("client_error")
                return leg
            if leg is None:
                self.metrics.fallback.labels("prefill_unavailable").inc()
            else:
                decode_raw = decode_body(body, leg)
        while spent < c.max_attempts and (attempts == 0 or time.monotonic() - arrival < c.retry_budget_s):
            route = self._route(named, key, tried)
            if route is None:
                break
            attempts += 1
            tried.add(route.replica.url)
            if attempts > 1:
                self.metrics.retries.inc()
            if route.fallback_reason:
                self.metrics.fallback.labels(route.fallback_reason).inc()
            kv_leg = decode_raw is not None and attempts == 1 and route.replica in self.pool.primaries
            payload = decode_raw if kv_leg else self._payload(raw, body, route)  # retries: colocated
            result = await self._attempt(route, method, target, payload, fwd_headers, stream, attempts,
                                         kv_leg, named)
            if isinstance(result, Response):
                if named is not None and result.status_code < 300:
                    self.owners.answered(method, named, route.replica.url)
                return result
            reasons.append(f"{route.replica.name}: {result.reason}")
            if kv_leg and result.reason == KV_FAILED:  # the same instance may still serve it colocated
                tried.discard(route.replica.url)
            spent += not (result.refused or result.missing)
            if result.missing:
                missing = result.response
            else:
                refusal = result.response or refusal
        if refusal is not None:  # every replica tried refused (e.g. all queues full): pass the last refusal on
            self.metrics.count("rejected")
            return refusal
        if missing is not None:  # no replica up keeps the response named: the last 404 (or 400) says so
            self.metrics.count("client_error")
            return missing
        self.metrics.count("unavailable")
        detail = f" after {attempts} attempt(s): " + "; ".join(reasons) if reasons else ""
        return _error_response(NoReplicaAvailableError(f"no replica can serve the request{detail}",
                                                       retry_after_s=c.retry_after_s))

    async def _attempt(self, route: Route, method: str, path: str, payload: bytes,
                       headers: list[tuple[str, str]], stream: bool, attempts: int,
                       kv_leg: bool = False, named: str | None = None) -> Response | _Rejected:
        """One attempt. kv_leg: a decode attempt pulling a prefill's KV; its failure to get the KV (a 503, or an
        error as the stream's first event) is retried colocated without holding it against the replica. named:
        the stored response the request needs; a replica's answer that it keeps none such is `missing`."""
        replica = route.replica
        replica.outstanding += 1
        replica.num_requests += 1
        handed_off = False  # once a stream is handed to the relay, the relay releases the replica
        resp: UpstreamResponse | None = None
        try:
            resp = await self.upstream.send(method, replica.url + path, payload or None, headers,
                                            self._timeout())
            if resp.status_code in _RETRY_STATUSES:
                content = await resp.aread()
                if kv_leg and is_transfer_failure(content):
                    return _Rejected(KV_FAILED, refused=True)
                if resp.status_code in _EJECT_STATUSES:
                    replica.eject(f"answered {resp.status_code}")
                    replica.num_failed += 1
                refusal = Response(content, resp.status_code, _response_headers(resp, route, attempts))
                return _Rejected(f"answered {resp.status_code}", refusal)
            if not stream or resp.status_code != 200:
                content = await resp.aread()
                if named is not None and is_not_found(resp.status_code, content):
                    return _Rejected(f"keeps no response {named!r}", missing=True,
                                     response=Response(content, resp.status_code,
                                                       _response_headers(resp, route, attempts)))
                replica.num_succeeded += 1
                if creates_response(method, path) and resp.status_code == 200:
                    self.owners.learn(body_response_id(content), replica.url)
                self.metrics.count("ok" if resp.status_code < 400 else
                                   "client_error" if resp.status_code < 500 else "error")
                return Response(content, resp.status_code, _response_headers(resp, route, attempts))
            buffer = bytearray()
            chunks = resp.aiter_bytes()
            first: list[bytes] = []
            async for chunk in chunks:  # commit only once a whole first event is here
                buffer += chunk
                first = _split_events(buffer)
                if first:
                    break
            if not first:
                raise httpx.RemoteProtocolError("stream ended before its first event")
            if kv_leg and first[0].startswith(b"data: {\"error\"") and is_transfer_failure(first[0]):
                return _Rejected(KV_FAILED, refused=True)
            if creates_response(method, path):  # its first event (response.created) names it: already here
                self.owners.learn(event_response_id(first[0]), replica.url)
            replica.num_succeeded += 1
            handed_off = True
            release = self._release(replica, resp)
            return _RelayedStream(self._relay(replica, resp, chunks, buffer, first, release), release,
                                  status_code=200, headers=_response_headers(resp, route, attempts))
        except httpx.TimeoutException as e:
            return self._failed(replica, f"timed out ({type(e).__name__})")
        except httpx.ConnectError as e:
            return self._failed(replica, f"connection failed ({type(e).__name__})", refused=True)
        except httpx.TransportError as e:
            if self.ending:  # end_in_flight: not the replica's fault, and no retry
                return self._drain_timed_out()
            return self._failed(replica, f"connection failed ({type(e).__name__})")
        finally:
            if not handed_off:
                replica.outstanding -= 1
                if resp is not None:
                    await resp.aclose()

    def end_in_flight(self) -> None:
        """At the drain timeout: end every request still in flight in-band, before uvicorn cuts the client
        connections mid-body: a relayed stream with its error event and [DONE], one waiting for its replica
        with a 503 (not retried), disaggregation's prefill legs too (their upstream is the same); the
        replicas see the aborts."""
        self.ending = True
        self.upstream.abort_all(Aborted("the router is shutting down"))

    def _drain_timed_out(self) -> Response:
        """A request that end_in_flight ended before any byte went out: a 503, to retry elsewhere."""
        self.metrics.count("cancelled")
        return _error_response(RouterDrainingError("the router is shutting down: its drain timeout passed",
                                                   retry_after_s=self.config.retry_after_s))

    def _failed(self, replica: Replica, reason: str, refused: bool = False) -> _Rejected:
        replica.num_failed += 1
        replica.eject(reason)
        return _Rejected(reason, refused=refused)

    def _release(self, replica: Replica,
                 resp: UpstreamResponse) -> Callable[[str], Awaitable[None]]:
        """The end of a relayed stream, to run once: its replica's count, its outcome, its connection."""
        released = False

        async def release(outcome: str) -> None:
            nonlocal released
            if not released:
                released = True
                replica.outstanding -= 1
                self.metrics.count(outcome)
                await resp.aclose()

        return release

    async def _relay(self, replica: Replica, resp: UpstreamResponse,
                     chunks: AsyncIterator[bytes], buffer: bytearray,
                     first: list[bytes], release: Callable[[str], Awaitable[None]]) -> AsyncIterator[bytes]:
        """Pass the stream's events through as they come; end a broken stream with one error event."""
        done = False
        outcome = "cancelled"  # unless it ends one way or the other: the client went away
        try:
            head = b"".join(first)
            done = _has_done(head)
            yield head
            try:
                async for chunk in chunks:
                    if not buffer and chunk.endswith(b"\n\n"):  # the usual case: whole events, as sent
                        whole = chunk
                    else:
                        buffer += chunk
                        whole = _take_whole_events(buffer)
                    if whole:  # the chunk's whole events in one send: a send costs more than its bytes
                        done = done or _has_done(whole)
                        yield whole
                reason = None if done else "the replica closed the stream before its last event"
            except httpx.TimeoutException:
                reason = "the replica stopped sending (read timeout)"
                replica.eject("timed out mid-stream")
            except httpx.TransportError as e:
                if self.ending:  # end_in_flight: not the replica's fault
                    yield sse_error(RouterDrainingError("the router is shutting down: its drain timeout "
                                                        "passed; the response is incomplete")).encode()
                    yield SSE_DONE.encode()
                    return
                reason = f"the replica's connection broke ({type(e).__name__})"
                replica.eject(f"stream broke ({type(e).__name__})")
            if reason is None:
                outcome = "ok"
                return
            outcome = "stream_broken"
            replica.num_failed += 1
            logger.warning("stream from %s broke mid-way: %s", replica.name, reason)
            yield sse_error(UpstreamStreamError(f"{reason}; the response is incomplete")).encode()
            yield SSE_DONE.encode()
        finally:
            await release(outcome)


def _error_response(exc: Exception) -> Response:
    status, body, headers = error_payload(exc)
    return Response(json.dumps(body).encode(), status, headers, media_type="application/json")
