"""ServeConfig: the HTTP server's own settings (the engine's are EngineArgs)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024


@dataclass
class ServeConfig:
    """What the OpenAI-compatible app needs beyond the engine.

    `served_model_names[0]` is the name returned in responses; every name in the list is accepted in
    requests. `max_queue_len` bounds the engine's waiting queue: past it, new requests get 429 with
    Retry-After instead of queueing without bound.
    """

    served_model_names: list[str] = field(default_factory=lambda: ["meshserve"])
    api_key: str | list[str] | None = None  # one key, or any of several (vLLM's --api-key K1 K2)
    max_queue_len: int = 1024
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    retry_after_s: int = 1
    drain_timeout_s: float = 30.0
    max_model_len: int | None = None  # shown in /v1/models; filled from the engine when None
    enable_auto_tool_choice: bool = False  # tool_choice "auto": the model decides, tool_call_parser reads it
    tool_call_parser: str | None = None  # a name in meshserve.serve.tool_parsers.TOOL_PARSERS
    reasoning_parser: str | None = None  # a name in meshserve.serve.reasoning.REASONING_PARSERS (chat only)
    gc_freeze: bool = True  # freeze the start-up heap once serving, so full collections stay short (heap.py)
    request_log: str | None = None  # --request-log: a JSON line per served prompt (request_log.py)
    responses_store_size: int = 0  # --responses-store-size: responses kept for previous_response_id (0: none)
    # vLLM's front-end flags (serve/vllm_compat_args.py); the defaults are vLLM's
    chat_template: str | None = None  # Jinja text rendering every chat instead of the tokenizer's
    chat_template_content_format: str = "auto"  # auto | string | openai (chat_content_format.py)
    response_role: str = "assistant"
    max_logprobs: int = 20  # most logprobs a request may ask for per position
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])  # CORS
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    root_path: str = ""  # the prefix a proxy serves the app under
    disable_fastapi_docs: bool = False
    enable_log_requests: bool = False  # log each generation request's parameters and prompt
    max_log_len: int | None = None  # ... cut to this many characters / token ids
    enable_log_outputs: bool = False  # with enable_log_requests: each finished output too
    enable_force_include_usage: bool = False  # every stream ends with usage
    return_tokens_as_token_ids: bool = False  # the server's default for the request field
    default_chat_template_kwargs: dict = field(default_factory=dict)  # under each request's own
    trust_request_chat_template: bool = False  # a request may bring its own chat_template
    exclude_tools_when_tool_choice_none: bool = False  # tool_choice "none": the template gets no tools
    enable_request_id_headers: bool = False  # every response carries X-Request-Id (middleware.py)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
