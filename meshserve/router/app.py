"""The router's FastAPI app: the OpenAI routes proxied to replicas, plus its own probes and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from meshserve import __version__
from meshserve.errors import RouterDrainingError, RouterOverloadedError
from meshserve.router.config import RouterConfig
from meshserve.router.health import HealthChecker
from meshserve.router.metrics import RouterMetrics
from meshserve.router.pool import ReplicaPool
from meshserve.router.proxy import Proxy
from meshserve.router.upstream import make_upstream
from meshserve.serve.errors import error_payload
from meshserve.serve.middleware import ServerState, send_error
from meshserve.serve.streaming import cancel_on_disconnect

logger = logging.getLogger(__name__)

# SageMaker's /invocations (vLLM's: chat or completions, by its body) is a generation route like /v1's
PROXIED_POST = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/invocations")
# what the admission gate counts and refuses (drain, --max-outstanding): the proxied API, not the probes
ADMITTED_PREFIXES = ("/v1", "/invocations")
# a stored response's routes: the proxy sends each to the replica that keeps it (response_affinity.py)
PROXIED_RESPONSE_ROUTES = (("/v1/responses/{response_id}", ["GET", "DELETE"]),
                           ("/v1/responses/{response_id}/input_items", ["GET"]),
                           ("/v1/responses/{response_id}/cancel", ["POST"]))


class AdmissionMiddleware:
    """Refuses /v1 (and /invocations) requests while draining or past --max-outstanding, and counts the rest in
    flight (streams until their last byte), which is what the draining server waits on."""

    def __init__(self, app: ASGIApp, config: RouterConfig, state: ServerState, metrics: RouterMetrics):
        self.app = app
        self.config = config
        self.state = state
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(ADMITTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            self.metrics.count("rejected")
            await send_error(send, RouterDrainingError("the router is shutting down",
                                                       retry_after_s=self.config.retry_after_s))
            return
        if self.state.num_in_flight >= self.config.max_outstanding:
            self.metrics.count("rejected")
            await send_error(send, RouterOverloadedError(
                f"the router has {self.state.num_in_flight} requests in flight",
                retry_after_s=self.config.retry_after_s))
            return
        with self.state.in_flight():
            await self.app(scope, receive, send)


# keep-alive shorter than the replicas' (uvicorn 5 s) so a pooled connection is never reused just
# as the replica closes it, which would look like a failure and eject a healthy replica
KEEPALIVE_EXPIRY_S = 2.0


def make_client(config: RouterConfig) -> httpx.AsyncClient:
    # every stream in flight holds a connection: keep as many alive, or each finished stream's is re-dialled
    limits = httpx.Limits(max_connections=config.max_outstanding + 64,
                          max_keepalive_connections=config.max_outstanding,
                          keepalive_expiry=KEEPALIVE_EXPIRY_S)
    return httpx.AsyncClient(limits=limits, trust_env=False)


def build_router_app(config: RouterConfig, state: ServerState | None = None,
                     pool: ReplicaPool | None = None) -> FastAPI:
    """The router app; its health loop runs for the app's lifespan."""
    config.validate()
    state = state or ServerState(ready=True)
    pool = pool or ReplicaPool(config)
    metrics = RouterMetrics(pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = make_client(config)
        upstream = make_upstream(client, KEEPALIVE_EXPIRY_S)
        health = HealthChecker(pool, config, client)
        app.state.proxy = Proxy(pool, config, metrics, client, upstream)
        app.state.health = health
        await health.check_all()  # know who is up before the first request
        health.start()
        publisher = asyncio.create_task(metrics.publish_forever()) if metrics.shared else None
        try:
            yield
        finally:
            if publisher is not None:
                publisher.cancel()
            await health.stop()
            await upstream.aclose()
            await client.aclose()

    app = FastAPI(title="meshserve router", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible router in front of meshserve replicas")
    app.state.serve_state = state
    app.state.pool = pool
    app.state.metrics = metrics
    app.add_middleware(AdmissionMiddleware, config=config, state=state, metrics=metrics)

    async def proxied(request: Request) -> Response:
        raw = await request.body()
        work = request.app.state.proxy.forward(request.method, request.url.path, raw, request.scope["headers"],
                                               request.url.query)
        # a client that leaves before the answer cancels the upstream call, so the replica aborts it too
        return await cancel_on_disconnect(request, work)

    for path in PROXIED_POST:
        app.add_api_route(path, proxied, methods=["POST"], include_in_schema=True)
    for path, methods in PROXIED_RESPONSE_ROUTES:
        for method in methods:  # a route a method: one route of two methods gave both one OpenAPI operation id
            app.add_api_route(path, proxied, methods=[method])
    app.add_api_route("/v1/models", proxied, methods=["GET"])

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/ping")  # SageMaker's health check (vLLM's): the router's own /health, as there
    @app.post("/ping")
    async def ping() -> JSONResponse:
        return await health()

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not any(r.healthy for r in pool.all()):
            return JSONResponse({"status": "no healthy replica"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/router/replicas")
    async def replicas() -> JSONResponse:
        """Every replica's health, load and counters as this router process sees them (for operators and
        tests; with --workers N, the worker that answered)."""
        return JSONResponse({"queue_depth": pool.queue_depth(), "desired_replicas": pool.desired_replicas(),
                             "in_flight": state.num_in_flight, "worker_pid": os.getpid(),
                             "replicas": [r.snapshot() for r in pool.all()]})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(Exception)
    async def on_any(_: Request, exc: Exception) -> Response:
        status, body, headers = error_payload(exc)
        return Response(json.dumps(body).encode(), status, headers, media_type="application/json")

    return app
