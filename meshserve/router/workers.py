"""`meshserve router --workers N`: N router processes serving one listening socket.

One router process relays every streamed chunk of every request on one GIL: at W3's load (~13,500 chunks/s,
~100 requests/s) it saturates, and then everything queued behind it waits, a replica's instant 429 included. N
workers (uvicorn's --workers, vLLM's --api-server-count) split that work: this process binds the socket and
spawns them; each inherits it and accepts connections (the kernel hands a new connection to whichever accepts
first, i.e. the least busy). Each worker is a whole router: its own replica pool, health checks and retries
(so /router/replicas describes the worker that answered, and --max-outstanding bounds each worker); /metrics
describes the whole router, whichever worker answers (prometheus_client's multiprocess files in a directory
this process owns; router/metrics.py says how each series is merged). SIGTERM / SIGINT here drains every
worker (each finishes its streams), then returns; a worker that dies is restarted (it probes every replica
before it accepts; its in-flight gauges are dropped, its counters kept); each worker dies with this process.
Nothing heavy is imported at the top: a spawned worker unpickles its arguments before it sets
PROMETHEUS_MULTIPROC_DIR, which must come before prometheus_client.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from meshserve.router.config import RouterConfig
from meshserve.serve import multiprocess_metrics

logger = logging.getLogger(__name__)

MAX_DEFAULT_WORKERS = 4  # past this, the replicas' own API processes are what is short of cores
_RESTART_DELAY_S = 1.0


def default_workers() -> int:
    """min(4, usable cores): the router's share of a node that also runs the replicas' API processes."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


@dataclass(frozen=True)
class RouterHttp:
    """uvicorn's settings of every router process."""

    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "warning"
    access_log: bool = False


def _worker_main(config: RouterConfig, sock: socket.socket, http: RouterHttp, index: int,
                 log_level: int, metrics_dir: str) -> None:
    multiprocess_metrics.enter(metrics_dir)  # before prometheus_client is imported
    from meshserve.distributed.launch import die_with_parent
    from meshserve.router.cli import serve_router

    die_with_parent()
    os.setpgrp()  # a terminal's Ctrl-C reaches the parent only; it drains every worker once
    logging.basicConfig(format=f"%(levelname)s router-{index} %(name)s: %(message)s", stream=sys.stderr,
                        level=log_level)
    try:
        serve_router(config, http, sock)
    finally:
        sock.close()


def serve_workers(config: RouterConfig, http: RouterHttp, count: int, sock: socket.socket | None = None) -> int:
    """Run `count` router workers on sock (else http.host:http.port, bound here) until SIGTERM / SIGINT, drain
    them, return 0."""
    from meshserve.distributed.launch import StopSignal, stop_processes
    from meshserve.serve.cli import bind_listen_socket

    sock = sock if sock is not None else bind_listen_socket(http.host, http.port)
    sock.listen(4096)  # connections queue in the kernel until a worker accepts them
    ctx = mp.get_context("spawn")
    log_level = logging.getLogger().getEffectiveLevel()
    stop = StopSignal()
    metrics_dir = multiprocess_metrics.new_dir()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}

    def start(i: int) -> mp.Process:
        p = ctx.Process(target=_worker_main, name=f"meshserve-router-{i}",
                        args=(config, sock, http, i, log_level, metrics_dir))
        p.start()
        return p

    procs = [start(i) for i in range(count)]
    dead_since: dict[int, float] = {}
    try:
        while stop.signal is None:
            for i, p in enumerate(procs):
                if p.is_alive():
                    continue
                now = time.monotonic()
                if i not in dead_since:  # not at once: a worker that cannot start must not spin
                    logger.warning("router worker %d exited (code %s); restarting it", i, p.exitcode)
                    multiprocess_metrics.mark_dead(metrics_dir, p.pid)  # its requests in flight are gone
                    dead_since[i] = now
                elif now - dead_since[i] >= _RESTART_DELAY_S:
                    del dead_since[i]
                    procs[i] = start(i)
            time.sleep(0.2)
        logger.warning("%s: draining %d router workers", signal.Signals(stop.signal).name, count)
        stop_processes(procs, config.drain_timeout_s + 5.0)
        return 0
    finally:
        stop_processes(procs, 0.0)
        sock.close()
        multiprocess_metrics.remove_dir(metrics_dir)
        for s, handler in previous.items():
            signal.signal(s, handler)

