"""The FastAPI app: OpenAI-compatible routes, probes, metrics, and the one exception-to-JSON mapping."""

from __future__ import annotations

import functools
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from meshserve import __version__
from meshserve.engine.async_engine import AsyncLLM
from meshserve.errors import InvalidArgumentError, ModelNotFoundError
from meshserve.serve.config import ServeConfig
from meshserve.serve.engine_client import EngineClient
from meshserve.serve.errors import error_body, error_payload, validation_error_payload
from meshserve.serve.metrics import ServerMetrics
from meshserve.serve.middleware import (
    GateMiddleware,
    RequestIdHeaderMiddleware,
    RootPathMiddleware,
    ServerState,
)
from meshserve.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    StatusResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from meshserve.serve.request_log import RequestLog
from meshserve.serve.responses_protocol import ResponseObject, ResponsesRequest
from meshserve.serve.responses_routes import add_response_routes
from meshserve.serve.responses_store import ResponseStore
from meshserve.serve.sagemaker_routes import INVOCATION_BODY_SCHEMA, InvalidJSONBody, parse_invocation
from meshserve.serve.serving_chat import ChatService
from meshserve.serve.serving_completion import CompletionService
from meshserve.serve.serving_responses import ResponsesService
from meshserve.serve.serving_tokenize import TokenizeService
from meshserve.serve.streaming import cancel_on_disconnect

logger = logging.getLogger(__name__)

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)}
_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    # before OpenAPI 3.2, an event stream's schema describes one event: `data` is a JSON chunk or [DONE]
    200: {"content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE] at the end"},
                       "event": {"type": "string"}}}}},
          "description": "JSON, or server-sent events when stream is true"},
}
# the Responses API's stream: each event named by `event`, no [DONE] (responses_stream.py)
_RESPONSES_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    200: {"content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["event", "data"],
        "properties": {"event": {"type": "string", "description": "the event's type, e.g. response.completed"},
                       "data": {"type": "string", "description": "the event as JSON"}}}}},
          "description": "the response as JSON, or its events when stream is true"},
}
_PROBE_RESPONSES: dict[int | str, dict[str, Any]] = {503: {"model": StatusResponse}}


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def _json_error(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _gate_refused(metrics: ServerMetrics, exc: Exception) -> None:
    """A 429 from the gate (middleware.py), before parsing: counted as a rejected request and apart."""
    metrics.gate_refusals.inc()
    metrics.track().fail(exc)


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith("/v1"):
            metrics.count("invalid")
        return _json_error(400, validation_error_payload(list(exc.errors())))

    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")  # codes are strings, as everywhere
        return _json_error(exc.status_code, error_body(str(exc.detail), error_type, None, code),
                           dict(exc.headers or {}))

    async def on_any(_: Request, exc: Exception) -> JSONResponse:
        status, body, headers = error_payload(exc)
        return _json_error(status, body, headers)

    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_any)


async def _answer(request: Request, work) -> Response | Any:
    """Run a handler that may raise: errors become OpenAI JSON here, not in Starlette's error page."""
    try:
        return await cancel_on_disconnect(request, work)
    except Exception as exc:  # noqa: BLE001 - the single mapping point
        status, body, headers = error_payload(exc)
        return _json_error(status, body, headers)


def _named(body, request: Request):
    """body, named by the request's X-Request-Id header when it has one (vLLM's _base_request_id: the header
    wins over the body's request_id, with or without --enable-request-id-headers)."""
    return body.use_request_id_header(request.headers.get("x-request-id"))


def build_app(async_llm: AsyncLLM, config: ServeConfig, state: ServerState | None = None) -> FastAPI:
    """The OpenAI-compatible app around a running AsyncLLM."""
    state = state or ServerState()
    client = EngineClient(async_llm, config)
    max_model_len = config.max_model_len or client.max_model_len
    core_client = async_llm.core_client
    metrics = ServerMetrics(RequestLog(config.request_log) if config.request_log else None, max_model_len,
                            model_name=config.model_name, num_engines=getattr(core_client, "num_cores", 1),
                            cache_config=core_client.info.cache_config)
    metrics.watch_admission_margin(async_llm.admission_margin)
    completions = CompletionService(client, config, metrics)
    chat = ChatService(client, config, metrics)
    store = ResponseStore(config.responses_store_size) if config.responses_store_size else None
    responses = ResponsesService(chat, store)
    tokenizer = TokenizeService(client, config)

    docs = {"openapi_url": None, "docs_url": None, "redoc_url": None} if config.disable_fastapi_docs else {}
    app = FastAPI(title="meshserve", version=__version__, **docs,
                  description="OpenAI-compatible LLM inference server. With --api-key, every /v1 route (and "
                              "SageMaker's /invocations) needs "
                              "`Authorization: Bearer KEY` or `x-api-key: KEY`.")
    app.state.serve_state = state
    app.state.metrics = metrics
    app.state.engine_client = client
    _install_error_handlers(app, metrics)
    app.add_middleware(GateMiddleware, config=config, state=state, admission=client.frontend_admission_error,
                       on_reject=functools.partial(_gate_refused, metrics), on_request=client.load.ensure_watching)
    # outermost (added last): preflights are answered before the API key gate, and its refusals carry CORS headers
    app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=config.allowed_methods,
                       allow_headers=config.allowed_headers, allow_credentials=config.allow_credentials)
    if config.enable_request_id_headers:  # outside CORS and the gate: their answers carry it too
        app.add_middleware(RequestIdHeaderMiddleware)
    if config.root_path:  # outside the gate, which reads the path the routes see
        app.add_middleware(RootPathMiddleware, root_path=config.root_path)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_GENERATION_RESPONSES)
    async def create_completion(body: CompletionRequest, request: Request):
        return await _answer(request, completions.create(_named(body, request)))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_GENERATION_RESPONSES)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await _answer(request, chat.create(_named(body, request)))

    @app.post("/v1/responses", response_model=ResponseObject, responses=_RESPONSES_RESPONSES)
    async def create_response(body: ResponsesRequest, request: Request):
        return await _answer(request, responses.create(body))

    add_response_routes(app, responses, _ERRORS)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: TokenizeRequest, request: Request):
        return await _answer(request, tokenizer.tokenize(body))

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest, request: Request):
        return await _answer(request, tokenizer.detokenize(body))

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=name, max_model_len=max_model_len)
                               for name in config.served_model_names])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
    async def retrieve_model(model_id: str):
        if model_id not in config.served_model_names:
            return _json_error(*error_payload(ModelNotFoundError(model_id))[:2])
        return ModelCard(id=model_id, root=model_id, max_model_len=max_model_len)

    @app.get("/health", response_model=StatusResponse, responses=_PROBE_RESPONSES)
    async def health():
        if not client.is_running:
            return _json_error(503, {"status": "engine dead"})
        return StatusResponse(status="ok")

    # SageMaker's routes (vLLM's, sagemaker_routes.py): /ping is /health, /invocations serves chat or completions
    @app.get("/ping", response_model=StatusResponse, responses=_PROBE_RESPONSES)
    @app.post("/ping", response_model=StatusResponse, responses=_PROBE_RESPONSES)
    async def ping():
        return await health()

    @app.post("/invocations", responses=_GENERATION_RESPONSES, openapi_extra=INVOCATION_BODY_SCHEMA)
    async def invocations(request: Request):
        try:
            body = parse_invocation(await request.body(), request.headers.get("content-type", ""))
        except (InvalidJSONBody, InvalidArgumentError) as exc:  # as a /v1 route's body that fails validation
            metrics.count("invalid")
            if isinstance(exc, InvalidJSONBody):
                return _json_error(400, validation_error_payload([{"type": "json_invalid"}]))
            return _json_error(*error_payload(exc)[:2])
        body = _named(body, request)
        if isinstance(body, ChatCompletionRequest):
            return await _answer(request, chat.create(body))
        return await _answer(request, completions.create(body))

    @app.get("/ready", response_model=StatusResponse, responses=_PROBE_RESPONSES)
    async def ready():
        if state.draining:
            return _json_error(503, {"status": "draining"})
        if not state.ready or not client.is_running:
            return _json_error(503, {"status": "not ready"})
        return StatusResponse(status="ready")

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(client.stats()), media_type=CONTENT_TYPE_LATEST)

    return app
