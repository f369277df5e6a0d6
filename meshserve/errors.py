"""The error hierarchy of meshserve: engine, server and router.

Each class carries its HTTP status and OpenAI error type; meshserve.serve.errors.error_payload maps any of
them (and anything else) to a status code and OpenAI's error JSON, once, for both the server and the router.
"""


class MeshserveError(Exception):
    """Base class of every error meshserve raises on purpose."""

    http_status = 500
    error_type = "internal_error"


class InvalidArgumentError(MeshserveError, ValueError):
    """A request or configuration value is out of range or malformed."""

    http_status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidArgumentError):
    """prompt + max_tokens exceed max_model_len, or the request can never fit the KV cache."""


class ModelLoadError(MeshserveError):
    """A model cannot be loaded: missing or corrupt files, unsupported architecture."""

    error_type = "model_load_error"


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture is not one meshserve implements."""


class EngineDeadError(MeshserveError):
    """The engine loop stopped and cannot serve requests."""

    http_status = 503
    error_type = "service_unavailable"


# -- raised by the HTTP front ends (server and router) ----------------------------------------------
class ModelNotFoundError(MeshserveError):
    """The request names a model this server does not serve."""

    http_status = 404
    error_type = "not_found_error"
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist.")
        self.param = "model"


class ResponseNotFoundError(MeshserveError):
    """GET /v1/responses/{id} of a response this server does not keep (responses_store.py)."""

    http_status = 404
    error_type = "not_found_error"

    def __init__(self, response_id: str):
        super().__init__(f"no stored response with id {response_id!r}")
        self.param = "response_id"


class AuthenticationError(MeshserveError):
    """Missing or wrong API key."""

    http_status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class RequestTooLargeError(MeshserveError):
    """The request body exceeds --max-request-body-bytes."""

    http_status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RetryableError(MeshserveError):
    """A request refused for now; the response carries Retry-After."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServerOverloadedError(RetryableError):
    """The engine's waiting queue is full (--max-queue-len)."""

    http_status = 429
    error_type = "rate_limit_error"
    code = "server_overloaded"


class ServiceLevelError(RetryableError):
    """The request cannot meet its time-to-first-token target now (predicted at arrival, or while queued)."""

    http_status = 429
    error_type = "rate_limit_error"
    code = "slo_unattainable"


class ServiceLevelShedError(ServiceLevelError):
    """A queued request dropped once it could no longer meet its time-to-first-token target (--slo-shed-late):
    the same 429 as a refusal at arrival, told apart by its code (its answer comes late by nature)."""

    code = "slo_shed"


class ServerDrainingError(RetryableError):
    """The server is shutting down and takes no new requests."""

    http_status = 503
    error_type = "service_unavailable"
    code = "server_draining"


class KVTransferError(RetryableError):
    """A request's KV could not be received from its prefill instance (gone, timed out, unknown handle), or no
    blocks are free to receive it: the router retries it colocated."""

    http_status = 503
    error_type = "service_unavailable"
    # the receiving blocks may still be written (a one-sided read the transport could not cancel): the consumer
    # must never hand them out again
    blocks_unsafe = False
    code = "kv_transfer_failed"


class NoReplicaAvailableError(RetryableError):
    """No healthy replica (primary or fallback) could take the request: a fast 503, never a timeout."""

    http_status = 503
    error_type = "service_unavailable"
    code = "no_replica_available"


class RouterOverloadedError(RetryableError):
    """The router already has --max-outstanding requests in flight."""

    http_status = 503
    error_type = "service_unavailable"
    code = "router_overloaded"


class RouterDrainingError(RetryableError):
    """The router is shutting down and takes no new requests."""

    http_status = 503
    error_type = "service_unavailable"
    code = "server_draining"


class UpstreamStreamError(RetryableError):
    """A replica failed after part of a stream reached the client; sent in-band as the last event.

    The router never splices another replica's output into a started stream (it would duplicate or
    contradict tokens), so the client sees a clean error event and may retry the whole request.
    """

    http_status = 502
    error_type = "upstream_error"
    code = "upstream_stream_broken"
