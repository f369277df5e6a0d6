"""`meshserve router --backend URL [--backend URL ...] [--fallback URL ...]`: the data-parallel router."""

from __future__ import annotations

import argparse
import logging
import socket

from meshserve.errors import InvalidArgumentError
from meshserve.router.config import POLICIES, RouterConfig
from meshserve.router.workers import RouterHttp, default_workers, serve_workers

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8000
KEEP_ALIVE_S = 75


def add_router_args(p: argparse.ArgumentParser) -> None:
    """The router's own flags (the server flags --host/--port are added by `register`)."""
    d = RouterConfig()
    g = p.add_argument_group("replicas")
    g.add_argument("--backend", action="append", default=[], metavar="URL",
                   help="a primary replica's base URL, e.g. http://10.0.0.5:8000 (repeatable)")
    g.add_argument("--fallback", action="append", default=[], metavar="URL",
                   help="a fallback replica (smaller model) used when no primary can serve (repeatable)")
    g.add_argument("--decode", action="append", default=[], metavar="URL",
                   help="disaggregation: a decode instance (a kv_consumer server), a primary that pulls the KV "
                        "of prompts run on a --prefill instance (repeatable)")
    g.add_argument("--disagg-concurrent", action="store_true",
                   help="disaggregation: send the decode leg at once, beside the prefill leg, so a layer-wise "
                        "decode instance (kv_connector_extra_config layerwise) receives each layer as the "
                        "prefill finishes it (default: the decode leg after the prefill)")
    g.add_argument("--prefill", action="append", default=[], metavar="URL",
                   help="disaggregation: a prefill instance (a kv_producer server); each request's prompt runs "
                        "there first, then a --decode instance decodes it (repeatable)")
    g.add_argument("--discover", action="append", default=[], metavar="HOST:PORT",
                   help="resolve HOST (e.g. a headless Service) on every health round; each address is a "
                        "primary replica (repeatable)")
    g.add_argument("--fallback-model", default=None,
                   help="rewrite the request's model to this name when the fallback pool serves it")
    g = p.add_argument_group("balancing")
    g.add_argument("--policy", default=d.policy, choices=POLICIES)
    g.add_argument("--response-affinity-size", type=int, default=d.response_affinity_size,
                   help="Responses API: how many response ids the router remembers with the replica that "
                        "keeps each (replicas' --responses-store-size), for previous_response_id and "
                        "GET/DELETE /v1/responses/{id}; an id it does not remember is looked for on each "
                        "replica in turn")
    g.add_argument("--affinity-slack", type=int, default=d.affinity_slack,
                   help="prefix affinity: go least-loaded when the hashed replica has more than this many "
                        "requests beyond the least-loaded one")
    g = p.add_argument_group("health")
    g.add_argument("--health-interval", type=float, default=d.health_interval_s, help="seconds between probes")
    g.add_argument("--health-timeout", type=float, default=d.health_timeout_s, help="seconds per probe")
    g.add_argument("--fail-threshold", type=int, default=d.fail_threshold,
                   help="consecutive failed probes that eject a replica")
    g.add_argument("--recover-threshold", type=int, default=d.recover_threshold,
                   help="consecutive good probes that re-admit it")
    g = p.add_argument_group("retries and timeouts")
    g.add_argument("--connect-timeout", type=float, default=d.connect_timeout_s)
    g.add_argument("--read-timeout", type=float, default=d.read_timeout_s,
                   help="longest silence from a replica (whole generation for non-streamed requests)")
    g.add_argument("--max-attempts", type=int, default=d.max_attempts, help="attempts per request, first included; a refused connection does not count")
    g.add_argument("--retry-budget", type=float, default=d.retry_budget_s,
                   help="no new attempt starts this many seconds after the request arrived")
    g = p.add_argument_group("load, degradation and autoscaling")
    g.add_argument("--max-outstanding", type=int, default=d.max_outstanding,
                   help="requests in flight past which new ones get 503 + Retry-After at once")
    g.add_argument("--fallback-queue-threshold", type=int, default=None,
                   help="primary queue depth at which requests go to the fallback pool (default: never)")
    g.add_argument("--target-queue-per-replica", type=int, default=d.target_queue_per_replica,
                   help="desired replicas = ceil(queue depth / this)")
    g.add_argument("--retry-after", type=int, default=d.retry_after_s, help="Retry-After seconds on 503s")


def router_config_from(ns: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        backends=list(ns.backend) + list(ns.decode), fallbacks=list(ns.fallback), prefills=list(ns.prefill), disagg_concurrent=ns.disagg_concurrent, discover=list(ns.discover),
        fallback_model=ns.fallback_model, policy=ns.policy, affinity_slack=ns.affinity_slack,
        health_interval_s=ns.health_interval, health_timeout_s=ns.health_timeout,
        fail_threshold=ns.fail_threshold, recover_threshold=ns.recover_threshold,
        connect_timeout_s=ns.connect_timeout, read_timeout_s=ns.read_timeout, max_attempts=ns.max_attempts,
        retry_budget_s=ns.retry_budget, max_outstanding=ns.max_outstanding,
        fallback_queue_threshold=ns.fallback_queue_threshold,
        target_queue_per_replica=ns.target_queue_per_replica, retry_after_s=ns.retry_after,
        drain_timeout_s=ns.drain_timeout, response_affinity_size=ns.response_affinity_size).validate()


def register(subparsers) -> None:
    """Add the `router` subcommand to meshserve's subparsers."""
    p = subparsers.add_parser("router", help="data-parallel router in front of meshserve replicas",
                              description="Balance OpenAI API requests over meshserve replicas, with health "
                                          "checks, retries, prefix affinity and a fallback pool.")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0")
    g.add_argument("--port", type=int, default=DEFAULT_PORT)
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    g.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    g.add_argument("--disable-access-log", action="store_true")
    g.add_argument("--workers", type=int, default=None,
                   help="router processes sharing the port, each with its own health checks and replica "
                        "state (default: min(4, cores))")
    add_router_args(p)
    p.set_defaults(func=_cmd_router)


def resolve_workers(workers: int | None, flag: str = "--workers") -> int:
    """flag: the command line's name for it (`serve --router-workers`)."""
    if workers is None:
        return default_workers()
    if workers < 1:
        raise InvalidArgumentError(f"{flag} must be >= 1, got {workers}", param=flag[2:].replace("-", "_"))
    return workers


def run_router(config: RouterConfig, host: str, port: int, log_level: str = "warning",
               access_log: bool = False, workers: int = 1, sock: socket.socket | None = None) -> None:
    """Serve the router until SIGTERM/SIGINT, then drain in-flight requests (streams included); workers > 1:
    that many router processes on the one port (router/workers.py). sock: the port already bound (else bound
    here, so a port in use is one error line, not uvicorn's)."""
    from meshserve.serve.cli import bind_listen_socket

    http = RouterHttp(host, port, log_level, access_log)
    sock = sock if sock is not None else bind_listen_socket(host, port)
    try:
        if workers > 1:
            serve_workers(config, http, workers, sock)
        else:
            sock.listen(4096)
            serve_router(config, http, sock)
    finally:
        sock.close()


def serve_router(config: RouterConfig, http: RouterHttp, sock: socket.socket | None = None) -> None:
    """One router process on http.host:http.port, or on `sock` (a worker's inherited listening socket)."""
    import uvicorn

    from meshserve.router.app import build_router_app
    from meshserve.serve.middleware import ServerState
    from meshserve.serve.server import DrainingServer

    state = ServerState()
    app = build_router_app(config, state)
    # Idle keep-alive longer than a client's or load balancer's (60 s is common): the side that closes an
    # idle connection must be the client, or a request sent just as the router closes it is lost.
    uv_config = uvicorn.Config(app, host=http.host, port=http.port, log_level=http.log_level,
                               access_log=http.access_log, timeout_graceful_shutdown=2,
                               timeout_keep_alive=KEEP_ALIVE_S)
    server = DrainingServer(uv_config, state, config.drain_timeout_s,
                            on_drain_timeout=lambda: app.state.proxy.end_in_flight())
    server.run(sockets=[sock] if sock is not None else None)


def _cmd_router(ns: argparse.Namespace) -> int:
    config = router_config_from(ns)
    workers = resolve_workers(ns.workers)
    if not 0 <= ns.port <= 65535:
        raise InvalidArgumentError(f"--port must be in [0, 65535], got {ns.port}", param="port")
    from meshserve.serve.cli import bind_listen_socket

    sock = bind_listen_socket(ns.host, ns.port)  # before the line below: it shows the bound port (--port 0)
    replicas = len(config.backends) + len(config.discover)
    disagg = f", {len(config.prefills)} prefill instance(s) (disaggregated)" if config.prefills else ""
    print(f"meshserve: routing on http://{ns.host}:{sock.getsockname()[1]} over {replicas} primary source(s), "
          f"{len(config.fallbacks)} fallback(s){disagg}, policy {config.policy}, {workers} worker(s)",
          flush=True)
    run_router(config, ns.host, ns.port, ns.uvicorn_log_level, not ns.disable_access_log, workers, sock)
    return 0
