"""A bounded load generator for the fault-injection suite: classifies every request's fate.

Each request ends as exactly one of:
- ok: a complete answer (non-streamed JSON with finished choices, or a stream of one request id that ends
  with a finish reason and `[DONE]`);
- clean_error: an answer that says clearly it failed and can be retried (429/503 with Retry-After and
  OpenAI's error JSON, or a stream whose last event before `[DONE]` is one error event);
- lost: anything else (timeout, hang, dropped connection, malformed or spliced stream, bare 5xx).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

# scenario -> figures; the conftest prints them at the end of the run (one module, however imported)
FIGURES: dict[str, dict[str, int | float | str]] = {}


def record_figures(scenario: str, fig: dict) -> None:
    FIGURES[scenario] = fig


@dataclass
class Result:
    index: int
    phase: str
    stream: bool
    outcome: str = "lost"
    status: int | None = None
    replica: str | None = None
    attempts: int = 1
    fallback: str | None = None
    detail: str = ""
    seconds: float = 0.0
    sent_s: float = 0.0  # time.monotonic() at sending (the simulator's fault replay aligns runs on it)


@dataclass
class Load:
    """Keeps `concurrency` requests in flight until stopped or `limit` were sent."""

    base_url: str
    concurrency: int = 12
    stream_every: int = 4  # every n-th request streams
    max_tokens: int = 8
    stream_max_tokens: int = 160
    timeout_s: float = 30.0
    limit: int | None = None
    backoff_s: float = 0.0  # after a clean refusal, wait this long before the next request (as clients do)
    model: str = "tiny"
    phase: str = "start"
    results: list[Result] = field(default_factory=list)
    live_streams: Counter = field(default_factory=Counter)  # replica -> streams being read now
    # request index -> (replica, events read so far) of each stream being read now
    stream_progress: dict[int, tuple[str | None, int]] = field(default_factory=dict)
    sent: int = 0
    _stop: asyncio.Event | None = None

    def stop(self) -> None:
        assert self._stop is not None
        self._stop.set()

    def fresh_streams(self, replica: str, max_events: int) -> int:
        """Streams on `replica` that have shown at most `max_events` events: the replica is surely still
        generating them (a stream already read half-way may be finished upstream, its tail in transit)."""
        return sum(r == replica and n <= max_events for r, n in list(self.stream_progress.values()))

    async def wait_sent(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.sent < n:
            assert time.monotonic() < deadline, f"load stalled at {self.sent} sent"
            await asyncio.sleep(0.01)

    async def run(self) -> list[Result]:
        self._stop = asyncio.Event()
        limits = httpx.Limits(max_connections=self.concurrency + 8, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s, limits=limits) as client:
            await asyncio.gather(*(self._worker(client) for _ in range(self.concurrency)))
        return self.results

    async def _worker(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set() and (self.limit is None or self.sent < self.limit):
            i = self.sent
            self.sent += 1
            stream = self.stream_every > 0 and i % self.stream_every == self.stream_every - 1
            result = Result(i, self.phase, stream)
            t0 = result.sent_s = time.monotonic()
            try:
                if stream:
                    await self._stream(client, i, result)
                else:
                    await self._plain(client, i, result)
            except httpx.TimeoutException as e:
                result.outcome, result.detail = "lost", f"timeout: {type(e).__name__}"
            except httpx.HTTPError as e:
                result.outcome, result.detail = "lost", f"transport: {type(e).__name__}: {e!r} cause {e.__cause__!r} after {time.monotonic() - t0:.2f}s"
            result.seconds = time.monotonic() - t0
            self.results.append(result)
            if self.backoff_s and result.outcome == "clean_error":
                await asyncio.sleep(self.backoff_s)

    def _body(self, i: int, stream: bool) -> dict:
        body = {"model": self.model, "prompt": f"Request {i}: tell me a story about routers",
                "max_tokens": self.stream_max_tokens if stream else self.max_tokens, "ignore_eos": True,
                "temperature": 0}
        if stream:
            body["stream"] = True
        return body

    @staticmethod
    def _headers(result: Result, resp: httpx.Response) -> None:
        result.status = resp.status_code
        result.replica = resp.headers.get("x-meshserve-replica")
        result.attempts = int(resp.headers.get("x-meshserve-attempts", "1"))
        result.fallback = resp.headers.get("x-meshserve-fallback")

    @staticmethod
    def _refusal(result: Result, resp: httpx.Response, text: str) -> None:
        try:
            code = json.loads(text)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            result.detail = f"{resp.status_code} without an OpenAI error body"
            return
        if resp.status_code in (429, 503) and "retry-after" in resp.headers:
            result.outcome, result.detail = "clean_error", f"{resp.status_code} {code}"
        else:
            result.detail = f"{resp.status_code} {code}"

    async def _plain(self, client: httpx.AsyncClient, i: int, result: Result) -> None:
        resp = await client.post("/v1/completions", json=self._body(i, False))
        self._headers(result, resp)
        if resp.status_code != 200:
            self._refusal(result, resp, resp.text)
            return
        choices = resp.json().get("choices") or []
        if choices and all(c.get("finish_reason") in ("length", "stop") for c in choices):
            result.outcome = "ok"
        else:
            result.detail = f"incomplete body: {resp.text[:200]}"

    async def _stream(self, client: httpx.AsyncClient, i: int, result: Result) -> None:
        async with client.stream("POST", "/v1/completions", json=self._body(i, True)) as resp:
            self._headers(result, resp)
            if resp.status_code != 200:
                self._refusal(result, resp, (await resp.aread()).decode())
                return
            self.live_streams[result.replica] += 1
            self.stream_progress[i] = (result.replica, 0)
            data: list[str] = []
            try:
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        data.append(line[6:])
                        self.stream_progress[i] = (result.replica, len(data))
            finally:
                self.live_streams[result.replica] -= 1
                del self.stream_progress[i]
        if not data or data[-1] != "[DONE]":
            result.detail = "stream ended without [DONE]"
            return
        try:
            events = [json.loads(d) for d in data[:-1]]
        except json.JSONDecodeError as e:  # an event a line reader split in two is a broken stream: lost
            result.detail = f"malformed event: {e}"
            return
        errors = [k for k, e in enumerate(events) if "error" in e]
        ids = {e["id"] for e in events if "id" in e}
        if len(ids) > 1:
            result.detail = f"spliced stream: {len(ids)} request ids"
            return
        if errors:
            if errors != [len(events) - 1]:
                result.detail = "error event not last"
                return
            result.outcome, result.detail = "clean_error", events[-1]["error"].get("code", "")
            return
        finishes = [c.get("finish_reason") for e in events for c in e.get("choices", [])]
        if finishes and finishes[-1] in ("length", "stop"):
            result.outcome = "ok"
        else:
            result.detail = "stream without a finish reason"


def figures(results: list[Result], seconds: float) -> dict:
    """The suite's figures for one scenario."""
    outcomes = Counter(r.outcome for r in results)
    return {"sent": len(results), "succeeded": outcomes["ok"],
            "retried": sum(r.attempts > 1 for r in results),
            "fallback": sum(r.fallback is not None for r in results),
            "failed_cleanly": outcomes["clean_error"], "lost": outcomes["lost"], "seconds": round(seconds, 1)}
