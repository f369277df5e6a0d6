"""The one place where every error becomes a status code and OpenAI's error JSON (server and router).

The hierarchy (meshserve.errors) carries `http_status`, `error_type` and sometimes `code`. `error_payload`
maps any exception to `{"error": {"message", "type", "param", "code"}}`; unexpected exceptions become a
generic 500 whose body never contains a stack trace (it goes to the log instead).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from meshserve.errors import (
    EngineDeadError,
    InvalidArgumentError,
    MeshserveError,
    PromptTooLongError,
    RetryableError,
)

logger = logging.getLogger(__name__)


_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})

_CODES: list[tuple[type[BaseException], str]] = [
    (PromptTooLongError, "context_length_exceeded"),
    (InvalidArgumentError, "invalid_value"),
    (EngineDeadError, "engine_dead"),
]


def error_body(message: str, error_type: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, extra headers) for any exception raised while serving a request."""
    if isinstance(exc, MeshserveError):
        code = getattr(exc, "code", None)
        if code is None:
            code = next((c for cls, c in _CODES if isinstance(exc, cls)), None)
        headers = {}
        if isinstance(exc, RetryableError):
            headers["Retry-After"] = str(exc.retry_after_s)
        status = exc.http_status
        message = str(exc) if status < 500 or isinstance(exc, (EngineDeadError, RetryableError)) \
            else "internal server error"
        if status >= 500 and not isinstance(exc, RetryableError):
            logger.error("request failed: %s: %s", type(exc).__name__, exc)
        return status, error_body(message, exc.error_type, getattr(exc, "param", None), code), headers
    logger.error("unexpected error while serving a request", exc_info=exc)
    return 500, error_body("internal server error", "internal_error", None, "internal_error"), {}


def validation_error_payload(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's 400 body for a request that failed pydantic validation (or was not JSON at all)."""
    if not errors:
        return error_body("invalid request", "invalid_request_error", None, "invalid_request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return error_body("the request body is not valid JSON", "invalid_request_error", None, "invalid_json")
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in ("model_attributes_type", "dict_type"):
        return error_body("the request body must be a JSON object", "invalid_request_error", None, "invalid_json")
    # union members show up in loc ("prompt", "list[int]", 0): keep field names and indices only
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and (isinstance(p, int) or _FIELD.match(p))
           and p not in _TYPE_NAMES]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")  # pydantic's prefix for our own checks
    message = f"{param + ': ' if param else ''}{msg}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return error_body(message, "invalid_request_error", param, "invalid_value")
