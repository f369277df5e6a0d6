"""How much the router can proxy, on the CPU: `meshserve router` between cheap fake replicas and lean clients.

    python tools/router_capacity.py [--workers N] [--concurrency 256] [--duration 15] [--events 128]
                                    [--step-ms 20] [--refuse-every 0] [--router-pythonpath DIR]
                                    [--profile OUT] [--output-json F]

Fake replicas (one process, raw asyncio on uvloop, `--replicas` listeners): every --step-ms each open stream
gets one SSE event shaped like a completion chunk (as an engine step does), then a usage chunk and [DONE];
every --refuse-every-th request is answered at once with a 429 and an OpenAI error body, as a full replica
does. Clients (--client-procs processes of keep-alive raw sockets, closed loop) keep --concurrency streams in
flight through the router; a prober sends one request that the replicas refuse (header x-refuse) every 50 ms,
so the latency the router adds to a 429 is seen by a client that does not lag. Reported: requests/s and
events/s delivered, the router processes' CPU (from /proc, all workers) per request and per event, TTFT and
inter-event gaps, and the probe's 429 latency through the router and straight to a replica.
--router-pythonpath runs another source tree's router (an older commit's `git archive`) for a before/after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import time
import urllib.request

_CHUNK = ('{"id":"cmpl-%s","object":"text_completion","created":1764547200,"model":"fake",'
          '"choices":[{"index":0,"text":" token%d","logprobs":null,"finish_reason":%s,"stop_reason":null}],'
          '"usage":null}')
_USAGE = ('{"id":"cmpl-%s","object":"text_completion","created":1764547200,"model":"fake","choices":[],'
          '"usage":{"prompt_tokens":512,"total_tokens":%d,"completion_tokens":%d}}')
_REFUSAL = json.dumps({"error": {"message": "the server has 1024 requests waiting",
                                 "type": "ServerOverloaded", "param": None, "code": 429}}).encode()


# -- fake replicas -----------------------------------------------------------------------------------------
def _head(status: str, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status.encode() + b"\r\n" + extra


def _fixed(status: str, body: bytes, extra: bytes = b"") -> bytes:
    length = b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    return _head(status, extra) + length + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Streams:
    """The open streams of every fake replica; one ticker sends each its next event every step (as an engine
    step does)."""

    def __init__(self, events: int, step_s: float):
        self.events = events
        self.step_s = step_s
        self.open: dict[asyncio.StreamWriter, list] = {}  # writer -> [request id, events sent, done future]

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            for writer, st in list(self.open.items()):
                if writer.is_closing():  # the router left this stream: its handler's next read ends it
                    del self.open[writer]
                    st[2].set_result(None)
                    continue
                rid, n = st[0], st[1]
                if n < self.events:
                    finish = b'"length"' if n == self.events - 1 else b"null"
                    writer.write(_chunk(b"data: " + (_CHUNK % (rid, n, finish.decode())).encode() + b"\n\n"))
                    st[1] += 1
                else:
                    usage = (_USAGE % (rid, 512 + n, n)).encode()
                    end = _chunk(b"data: " + usage + b"\n\n") + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
                    writer.write(end)
                    del self.open[writer]
                    st[2].set_result(None)


async def _replica_conn(streams: _Streams, refuse_every: int, counter: list, reader, writer) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lower = head.lower()
            length = 0
            if b"content-length:" in lower:
                length = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            if length:
                await reader.readexactly(length)
            path = head.split(b" ", 2)[1]
            if path == b"/ready" or path == b"/health":
                writer.write(_fixed("200 OK", b'{"status":"ready"}'))
                continue
            if path == b"/metrics":
                writer.write(_fixed("200 OK", b'vllm:num_requests_waiting{engine="0",model_name="m"} 0.0\n'))
                continue
            counter[0] += 1
            if b"x-refuse:" in lower or (refuse_every and counter[0] % refuse_every == 0):
                writer.write(_fixed("429 Too Many Requests", _REFUSAL, b"retry-after: 1\r\n"))
                continue
            writer.write(_head("200 OK", b"content-type: text/event-stream\r\n"
                                         b"transfer-encoding: chunked\r\n\r\n"))
            done = asyncio.get_running_loop().create_future()
            streams.open[writer] = ["%08x" % random.getrandbits(32), 0, done]
            await done
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    except Exception as e:
        print("fake replica:", repr(e), file=sys.stderr)
    finally:
        streams.open.pop(writer, None)
        writer.close()


def replicas_main(ports: list[int], events: int, step_s: float, refuse_every: int) -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    async def run() -> None:
        streams = _Streams(events, step_s)
        counter = [0]
        def handler(r, w):
            return _replica_conn(streams, refuse_every, counter, r, w)

        servers = [await asyncio.start_server(handler, "127.0.0.1", port, backlog=4096) for port in ports]
        await asyncio.gather(streams.tick(), *(s.serve_forever() for s in servers))

    asyncio.run(run())


# -- clients -----------------------------------------------------------------------------------------------
async def _read_response(reader: asyncio.StreamReader) -> tuple[int, list[float]]:
    """Status and the arrival time of every event of the body (chunked) or of the body (content-length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    times: list[float] = []
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                return status, times
            data = await reader.readexactly(size + 2)
            now = time.perf_counter()
            times += [now] * data.count(b'"choices":[{')
    length = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    await reader.readexactly(length)
    return status, [time.perf_counter()]


def _request(port: int, refuse: bool = False) -> bytes:
    body = json.dumps({"model": "fake", "prompt": "x" * 2000, "max_tokens": 128, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    extra = b"x-refuse: 1\r\n" if refuse else b""
    return (b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n%s"
            b"content-length: %d\r\n\r\n" % (port, extra, len(body))) + body


async def _stream_worker(port: int, deadline: float, results: list) -> None:
    await asyncio.sleep(random.random())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer.write(_request(port))
            status, times = await _read_response(reader)
            gaps = [b - a for a, b in zip(times, times[1:])]
            results.append((status, t0, (times[0] - t0) if times else 0.0, len(times) if status == 200 else 0,
                            max(gaps) if gaps else 0.0))
    finally:
        writer.close()


async def _probe(port: int, deadline: float, results: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer.write(_request(port, refuse=True))
            status, _ = await _read_response(reader)
            results.append((status, time.perf_counter() - t0))
            await asyncio.sleep(0.05)
    finally:
        writer.close()


def client_main(port: int, concurrency: int, start_at: float, duration: float, probe_ports: list[int],
                out) -> None:
    async def run():
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = time.perf_counter() + duration
        results: list = []
        probes: dict[int, list] = {p: [] for p in probe_ports}
        tasks = [_stream_worker(port, deadline, results) for _ in range(concurrency)]
        tasks += [_probe(p, deadline, probes[p]) for p in probe_ports]
        done = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [repr(e) for e in done if isinstance(e, BaseException)]
        return results, probes, errors

    out.put(asyncio.run(run()))


# -- the run -----------------------------------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """pid and its descendants (the router's worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for child in os.listdir("/proc"):
            if child.isdigit():
                try:
                    with open(f"/proc/{child}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == p:
                            todo.append(int(child))
                except (OSError, ValueError):
                    pass
    return out


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the router exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("the router did not become ready")


def run(ns) -> dict:
    from meshserve.distributed.launch import free_port

    ctx = mp.get_context("spawn")
    replica_ports = [free_port() for _ in range(ns.replicas)]
    replicas = ctx.Process(target=replicas_main, daemon=True,
                           args=(replica_ports, ns.events, ns.step_ms / 1e3, ns.refuse_every))
    replicas.start()
    port = free_port()
    env = dict(os.environ)
    if ns.router_pythonpath:
        env["PYTHONPATH"] = ns.router_pythonpath
    # CPU time, not wall time: on a shared machine a write that wakes a client often loses the core
    profile = [] if not ns.profile else [
        "-c", "import cProfile, sys, time; from meshserve.cli import main; sys.argv[0] = 'meshserve'; "
        "p = cProfile.Profile(time.process_time); p.runcall(main, sys.argv[1:]); "
        f"p.dump_stats({ns.profile!r})"]
    backends = [a for p in replica_ports for a in ("--backend", f"http://127.0.0.1:{p}")]
    cmd = [sys.executable, *(profile or ["-m", "meshserve.cli"]), "router", "--host", "127.0.0.1",
           "--port", str(port), "--disable-access-log", *backends]
    if ns.workers is not None:
        cmd += ["--workers", str(ns.workers)]
    # `python -m` puts the working directory first on sys.path: run from the tree whose router is wanted
    router = subprocess.Popen(cmd, env=env, cwd=ns.router_pythonpath or None)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", router)
        time.sleep(2.0 if (ns.workers or 1) > 1 else 0.5)  # every worker listening and its replicas admitted
        out = ctx.Queue()
        per = [ns.concurrency // ns.client_procs + (i < ns.concurrency % ns.client_procs)
               for i in range(ns.client_procs)]
        start_at = time.time() + 2.0
        clients = [ctx.Process(target=client_main, args=(port, c, start_at, ns.duration,
                                                         [port, replica_ports[0]] if i == 0 else [], out))
                   for i, c in enumerate(per)]
        for c in clients:
            c.start()
        time.sleep(max(0.0, start_at - time.time()))
        pids = _tree(router.pid)
        cpu0, t0 = sum(_cpu_s(p) for p in pids), time.perf_counter()
        gathered = [out.get() for _ in clients]
        wall = time.perf_counter() - t0
        cpu = sum(_cpu_s(p) for p in pids) - cpu0
        for c in clients:
            c.join()
    finally:
        router.terminate()
        try:
            router.wait(30)
        except subprocess.TimeoutExpired:
            router.kill()
        replicas.kill()
    results = [r for rs, _, _ in gathered for r in rs]
    ok = [r for r in results if r[0] == 200]
    events = sum(r[3] for r in ok)
    probes = gathered[0][1]
    via_router = [s for st, s in probes[port] if st == 429]
    direct = [s for st, s in probes[replica_ports[0]] if st == 429]
    return {"workers": ns.workers or "default", "concurrency": ns.concurrency, "requests": len(results),
            "req/s": round(len(ok) / wall, 1), "events/s": round(events / wall),
            "ideal events/s": round(ns.concurrency / (ns.step_ms / 1e3)),
            "refused": sum(r[0] == 429 for r in results), "router cores busy": round(cpu / wall, 2),
            "router CPU ms/req": round(1e3 * cpu / max(len(results), 1), 2),
            "router CPU us/event": round(1e6 * cpu / max(events, 1), 1),
            "TTFT p50 ms": round(1e3 * _pct([r[2] for r in ok], 0.5), 1),
            "TTFT p99 ms": round(1e3 * _pct([r[2] for r in ok], 0.99), 1),
            "max gap p50 ms": round(1e3 * _pct([r[4] for r in ok], 0.5), 1),
            "429 via router p50 ms": round(1e3 * _pct(via_router, 0.5), 2),
            "429 via router p99 ms": round(1e3 * _pct(via_router, 0.99), 2),
            "429 direct p50 ms": round(1e3 * _pct(direct, 0.5), 2), "probes": len(via_router),
            "client errors": sum(len(e) for _, _, e in gathered)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=None,
                   help="the router's --workers (default: the router's own default)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=256, help="streams kept in flight")
    p.add_argument("--client-procs", type=int, default=1)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--events", type=int, default=128, help="token events per stream (then usage and [DONE])")
    p.add_argument("--step-ms", type=float, default=20.0, help="one event per open stream every step")
    p.add_argument("--refuse-every", type=int, default=0, help="every n-th request gets a 429 (0: none)")
    p.add_argument("--router-pythonpath", default=None)
    p.add_argument("--profile", default=None, metavar="OUT",
                   help="run the router under cProfile, its stats to OUT (one worker: --workers 1)")
    p.add_argument("--output-json", default=None)
    ns = p.parse_args(argv)
    row = run(ns)
    print(json.dumps(row, indent=1))
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
