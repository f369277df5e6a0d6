"""The error hierarchy. The server maps these once to HTTP status codes and OpenAI's error JSON."""


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
