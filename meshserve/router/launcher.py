"""`meshserve serve --data-parallel-size N`: N engine replicas (each with its own TP/PP) plus the router.

Each replica is a child `meshserve serve` process with the same flags, bound to loopback on a port of
its own, with its share of the GPUs (CUDA_VISIBLE_DEVICES split in slices of TP x PP devices). The router
listens on --host/--port. A replica that dies is restarted (with backoff) and re-admitted by the
router's health checks. SIGTERM drains the router, then the replicas.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from meshserve.distributed.data_parallel import partition_devices, visible_devices
from meshserve.errors import InvalidArgumentError
from meshserve.router.config import RouterConfig

logger = logging.getLogger(__name__)

# Flags the launcher sets itself for each replica, or that only mean something to the launcher.
# config_file: the namespace already holds what the file set, under the command line's flags; a replica reading
# the file again would let it override a flag given its default value.
_LAUNCHER_DESTS = frozenset({"host", "port", "data_parallel_size", "data_parallel_backend", "model_tag", "func",
                             "command", "auto", "router_workers", "config_file"})


def _long_option(action: argparse.Action) -> str:
    return next((o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")),
                action.option_strings[0])


def argv_from_namespace(parser: argparse.ArgumentParser, ns: argparse.Namespace,
                        skip: frozenset[str] = _LAUNCHER_DESTS) -> list[str]:
    """The flags that reproduce `ns` on `parser` (only those that differ from their defaults)."""
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or not hasattr(ns, action.dest):
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        value = getattr(ns, action.dest)
        if value == action.default:
            continue
        opt = _long_option(action)
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(opt if value else "--no-" + opt[2:])
        elif isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            argv.append(opt)
        elif isinstance(action, argparse._AppendAction):
            for v in value or []:
                argv += [opt, str(v)]
        elif action.nargs in ("+", "*") or isinstance(action.nargs, int):
            argv += [opt, *map(str, value)]
        elif value is not None:
            argv += [opt, str(value)]
    return argv


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ReplicaProcess:
    """One child `meshserve serve`; restarted with backoff when it dies unexpectedly."""

    def __init__(self, index: int, argv: list[str], env: dict[str, str]):
        self.index = index
        self.argv = argv
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.num_restarts = 0
        self._next_start = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env)
        logger.info("replica %d started (pid %d)", self.index, self.proc.pid)

    def supervise(self) -> None:
        if self.proc is None or self.proc.poll() is None:
            return
        now = time.monotonic()
        if self._next_start == 0.0:
            backoff = min(30.0, 2.0 * 2 ** min(self.num_restarts, 4))
            logger.warning("replica %d exited with %s; restarting in %.0f s", self.index,
                           self.proc.returncode, backoff)
            self._next_start = now + backoff
        if now >= self._next_start:
            self._next_start = 0.0
            self.num_restarts += 1
            self.start()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("replica %d did not exit in time; killing it", self.index)
            self.proc.kill()
            self.proc.wait()


def serve_data_parallel(ns: argparse.Namespace, serve_parser: argparse.ArgumentParser) -> int:
    """Run `ns.data_parallel_size` replicas of `meshserve serve` and the router in front of them."""
    from meshserve.router.cli import resolve_workers, run_router

    n = ns.data_parallel_size
    workers = resolve_workers(getattr(ns, "router_workers", None), "--router-workers")
    if getattr(ns, "nnodes", 1) > 1:
        raise InvalidArgumentError("--data-parallel-size runs replicas on this node only; across nodes, run "
                                   "one group per replica (deploy/k8s) and `meshserve router` in front",
                                   param="data_parallel_size")
    from meshserve.serve.cli import bind_listen_socket

    sock = bind_listen_socket(ns.host, ns.port)  # a port in use fails before any replica starts
    flags = argv_from_namespace(serve_parser, ns)
    per_replica = getattr(ns, "tensor_parallel_size", 1) * getattr(ns, "pipeline_parallel_size", 1)
    devices = partition_devices(n, per_replica, visible_devices(getattr(ns, "device", "auto")))
    log_level = getattr(ns, "log_level", "WARNING")
    replicas: list[ReplicaProcess] = []
    urls: list[str] = []
    for i in range(n):
        port = free_port()
        urls.append(f"http://127.0.0.1:{port}")
        env = dict(os.environ)
        if devices[i] is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices[i]
        argv = [sys.executable, "-m", "meshserve.cli", "--log-level", log_level, "serve", *flags,
                "--host", "127.0.0.1", "--port", str(port)]
        replicas.append(ReplicaProcess(i, argv, env))
    stopping = threading.Event()

    def supervise() -> None:
        while not stopping.wait(1.0):
            for r in replicas:
                r.supervise()

    for r in replicas:
        r.start()
    watcher = threading.Thread(target=supervise, name="replica-supervisor", daemon=True)
    watcher.start()
    # local children: a dead one refuses connections at once (and the supervisor restarts it), so the
    # probe can wait out a replica whose API process is slow on a busy machine instead of ejecting it
    config = RouterConfig(backends=urls, retry_after_s=1, drain_timeout_s=ns.drain_timeout,
                          health_interval_s=1.0, health_timeout_s=5.0)
    print(f"meshserve: data parallel {n} x (TP {getattr(ns, 'tensor_parallel_size', 1)}, "
          f"PP {getattr(ns, 'pipeline_parallel_size', 1)}): replicas on {', '.join(urls)}; "
          f"router ({workers} worker(s)) on http://{ns.host}:{ns.port}", flush=True)
    try:
        run_router(config, ns.host, ns.port, ns.uvicorn_log_level, not ns.disable_access_log, workers, sock)
    finally:
        stopping.set()
        watcher.join(5)
        for r in replicas:
            r.terminate()
        for r in replicas:
            r.wait(ns.drain_timeout + 10)
    return 0
