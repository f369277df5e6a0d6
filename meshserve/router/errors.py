"""The router's own errors; meshserve.serve.errors.error_payload maps them to status + OpenAI JSON."""

from __future__ import annotations

from meshserve.serve.errors import RetryableError


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
