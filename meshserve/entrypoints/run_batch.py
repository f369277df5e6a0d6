"""Running a batch file's requests through the OpenAI app, in process: the server's own request handling
(validation, chat templates, sampling defaults, tool and reasoning parsers, error bodies), no socket.

A bounded number of requests is in flight at once (the engine batches them); each output line is written in
input order as soon as every line before it is done, so memory holds only the lines that finished early.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

from meshserve.entrypoints.batch_lines import BatchLineError, BatchRequest, error_line, response_line


@dataclass
class BatchProgress:
    """Counts so far: ok is an endpoint's 200, failed everything else (refusals and bad lines)."""

    num_requests: int
    num_ok: int = 0
    num_failed: int = 0
    start: float = field(default_factory=time.monotonic)

    @property
    def num_done(self) -> int:
        return self.num_ok + self.num_failed

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start


class _OrderedWriter:
    """Writes output lines in input order: a line done early waits for those before it."""

    def __init__(self, out: TextIO):
        self.out = out
        self.next_index = 0
        self.waiting: dict[int, dict[str, Any]] = {}

    def put(self, index: int, line: dict[str, Any]) -> None:
        self.waiting[index] = line
        while self.next_index in self.waiting:
            self._write(self.waiting.pop(self.next_index))
            self.next_index += 1
        self.out.flush()

    def _write(self, line: dict[str, Any]) -> None:
        try:
            self.out.write(json.dumps(line, ensure_ascii=False) + "\n")
        except UnicodeEncodeError:  # a lone surrogate in custom_id, or an ASCII stdout: escaped, not lost
            self.out.write(json.dumps(line) + "\n")


async def _answer(client: httpx.AsyncClient, request: BatchRequest) -> dict[str, Any]:
    # ASCII escapes: a lone surrogate in a string reaches the app's own check (a 400), not a UTF-8 encode error
    response = await client.post(request.url, content=json.dumps(request.body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text, "type": "internal_error", "param": None, "code": None}}
    return response_line(request.custom_id, response.status_code, body)


async def run_batch(app, batch: list[BatchRequest | BatchLineError], out: TextIO, max_concurrent: int,
                    on_progress: Callable[[BatchProgress], None] | None = None) -> BatchProgress:
    """Answer every request of batch with app (an ASGI app: openai_api.build_app's), at most max_concurrent at
    once; write one output line each to out, in batch order."""
    progress = BatchProgress(len(batch))
    writer = _OrderedWriter(out)
    pending: Iterator[tuple[int, BatchRequest | BatchLineError]] = iter(enumerate(batch))

    def done(index: int, line: dict[str, Any]) -> None:
        writer.put(index, line)
        response = line["response"]
        if response is not None and response["status_code"] == 200:
            progress.num_ok += 1
        else:
            progress.num_failed += 1
        if on_progress is not None:
            on_progress(progress)

    async def work(client: httpx.AsyncClient) -> None:
        for index, item in pending:  # one iterator shared by every worker: each item is taken once
            if isinstance(item, BatchLineError):
                done(index, error_line(item.custom_id, item.code, item.message))
                continue
            try:
                line = await _answer(client, item)
            except Exception as e:  # noqa: BLE001 - the app failed outside its handlers: this line only
                line = error_line(item.custom_id, "internal_error", f"{type(e).__name__}: {e}")
            done(index, line)

    transport = httpx.ASGITransport(app=app)
    # no timeout: a request waits in the engine's queue behind the others as long as it takes
    async with httpx.AsyncClient(transport=transport, base_url="http://run-batch", timeout=None) as client:
        workers = min(max_concurrent, sum(isinstance(item, BatchRequest) for item in batch)) or 1
        await asyncio.gather(*(work(client) for _ in range(workers)))
    return progress
