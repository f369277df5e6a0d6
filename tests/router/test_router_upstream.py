"""The upstreams' abort_all (the router's drain timeout): a call waiting for its head, a body being read and a
later call all fail with the abort's exception, on the plain (httpx) path and on FastUpstream."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from meshserve.router.upstream import Aborted, FastUpstream, HttpxUpstream, httptools
from tests.router.conftest import Script, fake_replica_app, serve_in_thread, stop_all

UPSTREAMS = ["fast", "httpx"] if httptools is not None else ["httpx"]
TIMEOUT = httpx.Timeout(5.0, read=30.0)


def _upstream(kind: str, client: httpx.AsyncClient) -> FastUpstream | HttpxUpstream:
    return FastUpstream(2.0) if kind == "fast" else HttpxUpstream(client)


@pytest.mark.parametrize("kind", UPSTREAMS)
def test_abort_all_fails_calls_in_flight_and_later(kind):
    replica = serve_in_thread(fake_replica_app(Script("slow", num_events=400, event_delay_s=0.05,
                                                      answer_delay_s=20)))
    url = replica.base_url + "/v1/completions"
    headers = [("content-type", "application/json")]

    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            upstream = _upstream(kind, client)
            waiting = asyncio.create_task(upstream.send("POST", url, b'{"prompt": "x"}', headers, TIMEOUT))
            stream = await upstream.send("POST", url, b'{"prompt": "x", "stream": true}', headers, TIMEOUT)
            chunks = stream.aiter_bytes()
            first = await chunks.__anext__()
            await asyncio.sleep(0.2)  # the non-streamed call is waiting for its head
            assert not waiting.done()
            started = asyncio.get_running_loop().time()
            upstream.abort_all(Aborted("the router is shutting down"))
            with pytest.raises(Aborted):
                await waiting
            with pytest.raises(Aborted):
                async for chunk in chunks:  # what already arrived may still come, then the abort
                    first += chunk
            assert asyncio.get_running_loop().time() - started < 2  # at once, not after the replica's 20 s
            assert first.startswith(b"data: ") and b"[DONE]" not in first
            await stream.aclose()
            with pytest.raises(Aborted):
                await upstream.send("POST", url, b'{"prompt": "x"}', headers, TIMEOUT)
            await upstream.aclose()

    try:
        asyncio.run(scenario())
    finally:
        stop_all([replica])
