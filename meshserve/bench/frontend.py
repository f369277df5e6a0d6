"""`meshserve bench frontend`: can the API side keep up? The real server around a model-less core, on the CPU.

The server (`bench/frontend_server.py`: `meshserve serve`'s code path, with `--api-server-count N`) runs around
FakeEngineCore, which emits one token per running request every --step-ms, so the engine's cost is fixed and
known. Client processes (each an asyncio loop of lean keep-alive HTTP/1.1 connections, so the client is not
what saturates) keep --concurrency streaming completions in flight for --duration seconds. Reported: requests/s
and tokens/s delivered, the API processes' CPU per delivered token (from /proc), and what clients saw: TTFT
and time per output token (p50/p99) against the core's step, and SSE events per token (< 1 once lagging
clients get several tokens per event). --through-router puts `meshserve router` between the clients and the
server and adds its CPU, the requests, events and chunks (one per router send) the clients got: the rows that
the simulator's router node is fitted to (meshserve/simulator/router_calibration.toml).
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
import tempfile
import time
import urllib.request

from meshserve.bench.report import print_rows
from meshserve.cli_paths import check_output_file
from meshserve.cli_types import non_negative_float, positive_float, positive_int
from meshserve.errors import InvalidArgumentError


# -- the client ----------------------------------------------------------------------------------------
async def _read_response(reader: asyncio.StreamReader) -> tuple[int, list[tuple[float, bytes]]]:
    """Status and the body's chunks with their arrival times (one chunk per server send when chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = head.lower()
    chunks: list[tuple[float, bytes]] = []
    if b"transfer-encoding: chunked" in headers:
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            data = await reader.readexactly(size + 2)
            chunks.append((time.perf_counter(), data[:-2]))
    else:
        length = int(headers.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        chunks.append((time.perf_counter(), await reader.readexactly(length)))
    return status, chunks


def _request_bytes(port: int, body: dict) -> bytes:
    raw = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (port, len(raw))) + raw


async def _worker(port: int, deadline: float, ns, rng: random.Random, results: list) -> None:
    await asyncio.sleep(rng.random() * ns.ramp_s)  # arrivals spread out, not in lockstep
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            body = {"model": "fake", "prompt": [rng.randrange(100, 10000) for _ in range(ns.prompt_len)],
                    "max_tokens": ns.max_tokens, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            writer.write(_request_bytes(port, body))
            status, chunks = await _read_response(reader)
            if status != 200:
                results.append((status, t0, chunks[0][0] - t0, 0.0, 0, 0, len(chunks)))
                continue
            token_times = []
            tokens = events = 0
            for t, data in chunks:
                for event in data.split(b"\n\n"):
                    if not event.startswith(b"data: ") or event == b"data: [DONE]":
                        continue
                    if b'"usage":{' in event:
                        tokens = json.loads(event[6:])["usage"]["completion_tokens"]
                    elif b'"choices":[{' in event:
                        events += 1
                        token_times.append(t)
            if not token_times:
                results.append((0, t0, 0.0, 0.0, 0, 0, len(chunks)))
                continue
            ttft = token_times[0] - t0
            tpot = (token_times[-1] - token_times[0]) / (tokens - 1) if tokens > 1 else 0.0
            results.append((200, t0, ttft, tpot, tokens, events, len(chunks)))
    finally:
        writer.close()


def _client_main(port: int, concurrency: int, start_at: float, ns, seed: int, out: mp.Queue) -> None:
    async def run() -> list:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = time.perf_counter() + ns.duration
        results: list = []
        rng = random.Random(seed)
        workers = [_worker(port, deadline, ns, random.Random(rng.random()), results) for _ in range(concurrency)]
        done = await asyncio.gather(*workers, return_exceptions=True)
        errors = [repr(e) for e in done if isinstance(e, BaseException)]
        return results, errors

    out.put(asyncio.run(run()))


# -- the server ----------------------------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_frontend(ns, api_server_count: int) -> dict:
    from meshserve.distributed.launch import free_port

    port = free_port()
    pid_file = tempfile.mktemp(prefix="meshserve-fe-", suffix=".json")
    cmd = [sys.executable, "-m", "meshserve.bench.frontend_server", "--port", str(port), "--step-ms",
           str(ns.step_ms), "--api-server-count", str(api_server_count), "--max-num-seqs", str(ns.max_num_seqs),
           "--max-queue-len", str(ns.max_queue_len), "--pid-file", pid_file]
    if getattr(ns, "model", None):
        cmd += ["--model", ns.model] + (["--tokenizer", ns.tokenizer] if ns.tokenizer else [])
    server = subprocess.Popen(cmd)
    router, client_port = None, port
    try:
        _wait_ready(port, server)
        while not os.path.exists(pid_file):
            time.sleep(0.1)
        time.sleep(1.0 if api_server_count == 1 else 5.0)  # every API process listening
        with open(pid_file) as f:
            pids = json.load(f)
        if ns.through_router:  # `meshserve router` in front of the server: the clients talk to it
            client_port = free_port()
            env = dict(os.environ)
            if ns.router_pythonpath:  # the router of another source tree (an older commit's export)
                env["PYTHONPATH"] = ns.router_pythonpath
            # one router process (its CPU is what is measured); an older tree has no --workers and one process
            workers = [] if ns.router_pythonpath else ["--workers", "1"]
            # `python -m` puts the working directory first on sys.path: run from the wanted router's tree
            router = subprocess.Popen([sys.executable, "-m", "meshserve.cli", "router", "--host", "127.0.0.1",
                                       "--port", str(client_port), "--backend", f"http://127.0.0.1:{port}",
                                       "--disable-access-log", *workers], env=env,
                                      cwd=ns.router_pythonpath or None)
            _wait_ready(client_port, router)
            time.sleep(1.0)
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()
        per_client = [ns.concurrency // ns.client_procs + (i < ns.concurrency % ns.client_procs)
                      for i in range(ns.client_procs)]
        settings = argparse.Namespace(duration=ns.duration, ramp_s=ns.ramp_s, max_tokens=ns.max_tokens,
                                      prompt_len=ns.prompt_len)  # picklable: no parser callbacks
        start_at = time.time() + 2.0  # every client process imported and waiting
        clients = [ctx.Process(target=_client_main, args=(client_port, c, start_at, settings, i, out))
                   for i, c in enumerate(per_client)]
        for c in clients:
            c.start()
        time.sleep(max(0.0, start_at - time.time()))
        router_cpu0 = _cpu_s(router.pid) if router is not None else 0.0
        api_cpu0, core_cpu0, t0 = sum(_cpu_s(p) for p in pids["api"]), _cpu_s(pids["core"]), time.perf_counter()
        gathered = [out.get() for _ in clients]
        wall = time.perf_counter() - t0
        api_cpu, core_cpu = sum(_cpu_s(p) for p in pids["api"]) - api_cpu0, _cpu_s(pids["core"]) - core_cpu0
        router_cpu = _cpu_s(router.pid) - router_cpu0 if router is not None else 0.0
        for c in clients:
            c.join()
    finally:
        if router is not None:
            router.terminate()
            try:
                router.wait(30)
            except subprocess.TimeoutExpired:
                router.kill()
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        if os.path.exists(pid_file):
            os.unlink(pid_file)
    results = [r for rs, _ in gathered for r in rs]
    errors = [e for _, es in gathered for e in es]
    ok = [r for r in results if r[0] == 200]
    tokens = sum(r[4] for r in ok)
    events = sum(r[5] for r in ok)
    row = {"api servers": api_server_count, "concurrency": ns.concurrency, "step ms": ns.step_ms,
           "req/s": round(len(ok) / wall, 1), "tok/s": round(tokens / wall),
           "ideal tok/s": round(min(ns.concurrency, ns.max_num_seqs) / (ns.step_ms / 1e3)),
           "API CPU us/tok": round(1e6 * api_cpu / max(tokens, 1), 1), "API cores busy": round(api_cpu / wall, 2),
           "core cores busy": round(core_cpu / wall, 2),
           "TTFT p50 ms": round(1e3 * _pct([r[2] for r in ok], 0.5), 1),
           "TTFT p99 ms": round(1e3 * _pct([r[2] for r in ok], 0.99), 1),
           "TPOT p50 ms": round(1e3 * _pct([r[3] for r in ok], 0.5), 1),
           "TPOT p99 ms": round(1e3 * _pct([r[3] for r in ok], 0.99), 1),
           "events/tok": round(events / max(tokens, 1), 2), "rejected": sum(r[0] == 429 for r in results),
           "client errors": len(errors)}
    if router is not None:
        # the router's sends as the client sees them: one HTTP chunk per send (the first holds the head's
        # events too), whole requests counted (a 429 included); its CPU is what a router simulator node costs
        chunks = sum(r[6] for r in results)
        row.update({"requests": len(results), "tokens": tokens, "events": events, "chunks": chunks,
                    "router CPU s": round(router_cpu, 3), "router cores busy": round(router_cpu / wall, 2),
                    "router CPU us/event": round(1e6 * router_cpu / max(events, 1), 1),
                    "router chunks/event": round(chunks / max(events, 1), 3)})
    return row


def run_frontend_bench(ns) -> list[dict]:
    check_output_file(ns.output_json, "--output-json")  # before the runs: their rows must not be lost
    if ns.ramp_s >= ns.duration:  # every client would start after the measurement window: nothing measured
        raise InvalidArgumentError(f"--ramp-s {ns.ramp_s:g} must be shorter than --duration {ns.duration:g}",
                                   param="ramp_s")
    if ns.router_pythonpath is not None and not os.path.isdir(ns.router_pythonpath):
        raise InvalidArgumentError(f"--router-pythonpath {ns.router_pythonpath}: not a folder",
                                   param="router_pythonpath")
    # flags that did nothing without the one they go with: the whole run measured something else
    if ns.router_pythonpath is not None and not ns.through_router:
        raise InvalidArgumentError("--router-pythonpath picks the router of --through-router: add it",
                                   param="router_pythonpath")
    if ns.tokenizer is not None and not ns.model:
        raise InvalidArgumentError("--tokenizer goes with --model (the embedded model has its own)", param="tokenizer")
    if ns.model:  # a bad name or folder was the server child's traceback, then "the server exited with code 1"
        from meshserve.config import EngineArgs
        from meshserve.engine.args_check import check_engine_args

        check_engine_args(EngineArgs(model=ns.model, tokenizer=ns.tokenizer, load_format="dummy", device="cpu"))
    rows = [run_frontend(ns, n) for n in ns.api_server_count]
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def add_frontend_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("frontend", help="API server throughput and lag around a model-less core (CPU)")
    p.add_argument("--api-server-count", type=positive_int, nargs="+", default=[1], help="one run per value")
    p.add_argument("--step-ms", type=positive_float, default=20.0, help="the fake core's step time")
    p.add_argument("--concurrency", type=positive_int, default=128, help="streams kept in flight")
    p.add_argument("--client-procs", type=positive_int, default=2)
    p.add_argument("--duration", type=positive_float, default=20.0, help="seconds clients start new requests")
    p.add_argument("--ramp-s", type=non_negative_float, default=2.0, help="clients' first requests spread over this")
    p.add_argument("--max-tokens", type=positive_int, default=128)
    p.add_argument("--prompt-len", type=positive_int, default=32)
    p.add_argument("--max-num-seqs", type=positive_int, default=512)
    p.add_argument("--max-queue-len", type=positive_int, default=1 << 20,
                   help="the server's waiting queue; past it 429 (small: most requests refused, their cost apart)")
    p.add_argument("--through-router", action="store_true",
                   help="clients go through `meshserve router` in front of the server; reports the router "
                        "process's CPU per request and per streamed event (the simulator's router node)")
    p.add_argument("--router-pythonpath", default=None, metavar="DIR",
                   help="with --through-router: run the router from this source tree (e.g. `git archive` of an "
                        "older commit) for a before/after")
    p.add_argument("--model", default=None, metavar="PRESET",
                   help="the served model's config and --tokenizer (default: the embedded model and its tokenizer); "
                        "no weights are loaded")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="with --model: its tokenizer (e.g. `meshserve bench tokenizer DIR --model PRESET`)")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=lambda ns: print_rows(run_frontend_bench(ns)) or 0)
