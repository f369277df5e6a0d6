"""Where a refusal's time goes under load (issue 18), on the CPU: the front-end bench server, instrumented, and a
light prober beside `meshserve bench serve`.

    python tools/refusal_probe.py server OUT.json [frontend_server flags...]   # writes OUT.json at exit (SIGTERM)
    python tools/refusal_probe.py probe PORT SECONDS PERIOD_S OUT.json        # one request per period
    python tools/refusal_probe.py report SERVER.json PROBE.json

server: `meshserve.bench.frontend_server` with, for every 429, the times its first bytes were parsed, its ASGI call
began and its answer left; every request's wait for its body; and the API process's full (generation 2) garbage
collections with their wall time. probe: raw keep-alive sockets (64, so a slow admitted answer does not hold the
next probe back), one 512-id request with max_tokens 1 every PERIOD_S, so refusal latency is seen by a client that
does not lag itself. tools/refusal_cpu.sh runs both with the bench client.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import sys
import time


def serve(out_path: str, argv: list[str]) -> int:
    import atexit

    import uvicorn.protocols.http.httptools_impl as httptools_impl

    import meshserve.serve.middleware as middleware
    from meshserve.bench.frontend_server import main
    from meshserve.serve.frontend_load import ARRIVAL

    refusals: list[tuple[float, float, float]] = []  # (parsed, ASGI call, 429 sent), time.monotonic()
    body_waits: list[float] = []
    collections: list[tuple[float, float]] = []  # (time.time() at its end, seconds)

    begin = httptools_impl.HttpToolsProtocol.on_message_begin

    def on_message_begin(self) -> None:
        begin(self)
        self.scope["probe_parsed"] = time.monotonic()

    call = middleware.GateMiddleware.__call__

    async def gate(self, scope, receive, send) -> None:
        async def timed_send(message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 429:
                now = time.monotonic()
                refusals.append((scope.get("probe_parsed", now), ARRIVAL.get() or now, now))
            await send(message)

        await call(self, scope, receive, timed_send)

    limited_body = middleware.GateMiddleware._limited_body

    async def timed_body(self, scope, receive, send):
        t = time.monotonic()
        out = await limited_body(self, scope, receive, send)
        body_waits.append(time.monotonic() - t)
        return out

    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif info["generation"] == 2:
            collections.append((time.time(), time.perf_counter() - started[0]))

    def dump() -> None:
        with open(out_path, "w") as f:
            json.dump({"refusals": refusals, "body_waits": body_waits, "gen2": collections}, f)

    httptools_impl.HttpToolsProtocol.on_message_begin = on_message_begin
    middleware.GateMiddleware.__call__ = gate
    middleware.GateMiddleware._limited_body = timed_body
    gc.callbacks.append(on_gc)
    atexit.register(dump)
    return main(argv)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status, headers = int(head.split(b" ", 2)[1]), head.lower()
    if b"transfer-encoding: chunked" not in headers:
        return status, await reader.readexactly(int(headers.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]))
    body = b""
    while size := int((await reader.readline()).strip(), 16):
        body += (await reader.readexactly(size + 2))[:-2]
    await reader.readline()
    return status, body


async def _probe(port: int, seconds: float, period_s: float) -> list[tuple[int, str | None, float, float]]:
    rng = random.Random(7)
    free: asyncio.Queue = asyncio.Queue()
    for _ in range(64):
        free.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    results = []

    async def one() -> None:
        reader, writer = await free.get()
        body = json.dumps({"model": "fake", "prompt": [rng.randint(3, 10000) for _ in range(512)], "max_tokens": 1,
                           "ignore_eos": True, "stream": True}).encode()
        t = time.perf_counter()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: probe\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # one write: no lag between parts
        status, answer = await _read_response(reader)
        latency = time.perf_counter() - t
        code = json.loads(answer)["error"]["code"] if status != 200 else None
        results.append((status, code, latency, time.time()))
        free.put_nowait((reader, writer))

    end, tasks = time.perf_counter() + seconds, []
    while time.perf_counter() < end:
        tasks.append(asyncio.ensure_future(one()))
        await asyncio.sleep(period_s)
    await asyncio.gather(*tasks)
    return results


def _ms(values: list[float], q: float) -> str:
    import numpy as np

    return f"{np.percentile(values, q) * 1e3:.1f}" if values else "-"


def report(server_path: str, probe_path: str) -> None:
    with open(server_path) as f:
        server = json.load(f)
    with open(probe_path) as f:
        probes = json.load(f)
    refusals = server["refusals"]
    to_call = [c - p for p, c, _ in refusals]
    to_sent = [s - p for p, _, s in refusals]
    print(f"server: {len(refusals)} refusals: parsed -> ASGI call p50 {_ms(to_call, 50)} p99 {_ms(to_call, 99)} ms; "
          f"parsed -> 429 sent p50 {_ms(to_sent, 50)} p99 {_ms(to_sent, 99)} ms; body wait (every request) "
          f"p99 {_ms(server['body_waits'], 99)} ms")
    by_kind: dict[str, list[float]] = {}
    for status, code, latency, _ in probes:
        by_kind.setdefault(f"{status} {code}" if code else str(status), []).append(latency)
    for kind, v in sorted(by_kind.items()):
        print(f"probe {kind}: n {len(v)}, p50 {_ms(v, 50)} ms, p99 {_ms(v, 99)} ms, max {max(v) * 1e3:.1f} ms")
    t0 = min((t for *_, t in probes), default=0.0)
    during = [(round(t - t0, 1), round(s * 1e3)) for t, s in server["gen2"] if t > t0]
    print(f"full collections in the API process during the load (s into it, ms): {during}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "server":
        sys.exit(serve(args[0], args[1:]))
    elif cmd == "probe":
        found = asyncio.run(_probe(int(args[0]), float(args[1]), float(args[2])))
        with open(args[3], "w") as f:
            json.dump(found, f)
    elif cmd == "report":
        report(args[0], args[1])
    else:
        sys.exit(f"unknown command {cmd!r}: server, probe or report")
