"""SageMaker's routes, as vLLM's server has them (vllm/entrypoints/sagemaker/api_router.py).

GET and POST /ping answer as /health. POST /invocations serves its body as the first of vLLM's generation request
types it validates as, in vLLM's order (get_generate_invocation_types): a chat completion (ChatCompletionRequest:
`messages`), then a completion (CompletionRequest: `prompt`), through that route's own handler (streaming, errors
and all); a body that validates as neither is vLLM's 400, naming the types it expected. The gate
(middleware.py) treats /invocations as it treats /v1: API key, drain refusal, in-flight count, admission.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from meshserve.errors import InvalidArgumentError
from meshserve.serve.protocol import ChatCompletionRequest, CompletionRequest

# vLLM's order: a body that validates as several is served as the first
INVOCATION_TYPES: tuple[type[ChatCompletionRequest | CompletionRequest], ...] = (ChatCompletionRequest,
                                                                                 CompletionRequest)

# /invocations' body in /openapi.json: one of the request types (they are the /v1 routes' own schemas)
INVOCATION_BODY_SCHEMA: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"anyOf": [{"$ref": f"#/components/schemas/{t.__name__}"} for t in INVOCATION_TYPES]}}}}}


class InvalidJSONBody(Exception):
    """The body is not JSON at all (the server's usual 400 for that)."""


def parse_invocation(raw: bytes, content_type: str) -> ChatCompletionRequest | CompletionRequest:
    """The request an /invocations body is: vLLM's 400s for a content type other than application/json
    (validate_json_request) and for a body that validates as none of INVOCATION_TYPES (a JSON array, say, or a chat
    body whose fields are wrong); InvalidJSONBody if it is no JSON."""
    if content_type.lower().split(";", 1)[0].strip() != "application/json":
        raise InvalidArgumentError("Unsupported Media Type: Only 'application/json' is allowed")  # vLLM's words
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidJSONBody(str(e)) from e
    for request_type in INVOCATION_TYPES:
        try:
            return request_type.model_validate(body)
        except ValidationError:
            continue
    names = [t.__name__ for t in INVOCATION_TYPES]
    raise InvalidArgumentError(f"Cannot find suitable handler for request. Expected one of: {names}")  # vLLM's
