"""Soak `meshserve serve` at saturation: steady overload for N minutes through the server (CPU, a tiny random
model, loopback only), then report lost requests, the RSS of both processes over time, and whether /metrics
agreed with the client's own counts at every scrape.

    python tools/soak_server.py --minutes 10 --concurrency 32

Scrape check, every --scrape-s seconds: the engine's running + waiting never exceeds what the client has in
flight, and finished + rejected on the server never exceed what the client has sent; at the end (quiescent)
the server's request totals equal the client's, outcome by outcome. The server runs with
--max-num-seqs 8 --max-queue-len 16, so the load overflows it on purpose (429s are clean refusals).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.conftest import make_tiny_checkpoint  # noqa: E402
from tests.router.loadgen import Load  # noqa: E402


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def metric_values(text: str) -> dict[str, float]:
    """meshserve:'s samples by series; vLLM's (vllm:) by name, summed over their labels (engines)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("meshserve:"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
        elif line.startswith("vllm:"):
            name, value = line.rsplit(" ", 1)
            name = name.split("{")[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


async def soak(ns) -> int:
    model = make_tiny_checkpoint(tempfile.mkdtemp(prefix="soak-"), "llama")
    port = ns.port
    server = subprocess.Popen([sys.executable, "-m", "meshserve.cli", "serve", model, "--port", str(port),
                               "--host", "127.0.0.1", "--served-model-name", "tiny", "--max-model-len", "512",
                               "--max-num-seqs", "8", "--max-queue-len", "16", "--disable-access-log",
                               "--uvicorn-log-level", "warning"])
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(600):
                try:
                    if (await client.get(base + "/ready")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
        children = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(server.pid)]).split()]
        core_pid = max(children, key=rss_mib)  # the engine core (the other child is multiprocessing's tracker)
        load = Load(base, concurrency=ns.concurrency, stream_every=4, max_tokens=16, stream_max_tokens=96,
                    timeout_s=60, backoff_s=ns.backoff_s)
        runner = asyncio.create_task(load.run())
        t0 = time.monotonic()
        rss, violations, scrapes = [], [], 0
        async with httpx.AsyncClient(timeout=5) as client:
            while time.monotonic() - t0 < ns.minutes * 60:
                await asyncio.sleep(ns.scrape_s)
                in_flight = load.sent - len(load.results)
                sent = load.sent
                m = metric_values((await client.get(base + "/metrics")).text)
                scrapes += 1
                engine = m["vllm:num_requests_running"] + m["vllm:num_requests_waiting"]
                answered = sum(v for k, v in m.items() if k.startswith("meshserve:requests_total"))
                if engine > max(in_flight, load.sent - len(load.results)):
                    violations.append(f"{time.monotonic() - t0:.0f}s: engine holds {engine} > {in_flight} in flight")
                if answered > sent:
                    violations.append(f"{time.monotonic() - t0:.0f}s: server answered {answered} > {sent} sent")
                rss.append((round(time.monotonic() - t0), round(rss_mib(server.pid)), round(rss_mib(core_pid))))
        load.stop()
        results = await runner
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(timeout=5) as client:
            m = metric_values((await client.get(base + "/metrics")).text)
        client_counts = Counter(r.outcome for r in results)
        server_ok = m['meshserve:requests_total{outcome="length"}'] + m['meshserve:requests_total{outcome="stop"}']
        server_refused = m['meshserve:requests_total{outcome="rejected"}']
        print(f"soak: {ns.minutes} min, {ns.concurrency} in flight, {len(results)} requests: "
              f"{client_counts['ok']} ok, {client_counts['clean_error']} refused cleanly, {client_counts['lost']} lost")
        for r in [r for r in results if r.outcome == "lost"][:5]:
            print(f"  lost #{r.index} (stream={r.stream}, status={r.status}, {r.seconds:.1f} s): {r.detail}")
        print(f"server counted: {server_ok:.0f} finished, {server_refused:.0f} rejected; "
              f"engine running+waiting at the end {m['vllm:num_requests_running'] + m['vllm:num_requests_waiting']:.0f}")
        print(f"{scrapes} scrapes, {len(violations)} inconsistent" + ("".join(f"\n  {v}" for v in violations[:5])))
        print("RSS MiB (t s, API process, engine core):", rss[:: max(1, len(rss) // 12)] + rss[-1:])
        first, last = rss[min(2, len(rss) - 1)], rss[-1]
        print(f"RSS growth after warm-up: API {last[1] - first[1]:+d} MiB, core {last[2] - first[2]:+d} MiB")
        consistent = (server_ok == client_counts["ok"] and server_refused == client_counts["clean_error"]
                      and not violations)
        print("end totals match the client:", consistent)
        return 0 if client_counts["lost"] == 0 and consistent else 1
    finally:
        server.terminate()
        server.wait(60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--scrape-s", type=float, default=10)
    p.add_argument("--backoff-s", type=float, default=0.2, help="a refused client waits this long (0: retry at once)")
    p.add_argument("--port", type=int, default=8931)
    return asyncio.run(soak(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
