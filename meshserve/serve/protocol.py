"""Pydantic models of the OpenAI-compatible HTTP API: requests, responses, stream chunks, errors.

This is the only module where pydantic appears. Field names follow OpenAI's API; vLLM's extensions
(top_k, min_p, repetition_penalty, ignore_eos, ...) are accepted too. Types are strict (a boolean is not an
integer, nor an integer a boolean). Unknown fields are ignored, as OpenAI's clients send some we do not
implement (vLLM's models ignore them too: metadata, store, service_tier, prediction, ...); OpenAI and vLLM
parameters that change the answer and that meshserve does not implement (functions, suffix, audio,
mm_processor_kwargs, logprob_token_ids, ...) are declared so that a request using them gets a 400 naming them
rather than a silently different answer. A null where vLLM's model takes null (stream, n, echo, the penalties,
...) means the field's default, as in vLLM. Ranges here are the documented ones; SamplingParams validates
again for callers that bypass HTTP. tests/serve/test_request_field_parity.py goes through vLLM 0.26's fields.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_serializer, model_validator

from meshserve.engine.chat_template import text_parts

MAX_LOGPROBS = 20
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


def _nulls_as_unset(data: Any, names: frozenset[str]) -> Any:
    """The request body without the keys of `names` that are null: vLLM types these fields `X | None` and reads
    null as the default, where meshserve's types are plain (so the handlers need no None checks)."""
    if isinstance(data, dict) and any(data.get(k, 0) is None for k in names):
        return {k: v for k, v in data.items() if not (v is None and k in names)}
    return data


# -- errors -----------------------------------------------------------------------------------------
class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# -- requests ---------------------------------------------------------------------------------------
class StreamOptions(OpenAIModel):
    include_usage: bool = False
    # vLLM's: with include_usage, every chunk also carries the usage so far (its prompt, its choice's tokens)
    continuous_usage_stats: bool = False

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _nulls_as_unset(data, frozenset({"include_usage", "continuous_usage_stats"}))


class ServiceLevel(OpenAIModel):
    """meshserve extension: this request's targets, overriding the server's --slo-ttft-ms / --slo-tpot-ms."""

    ttft_ms: float | None = Field(None, gt=0, description="time to first token, milliseconds")
    tpot_ms: float | None = Field(None, gt=0, description="time per output token after the first, milliseconds")


class ResponseFormat(OpenAIModel):
    """OpenAI's response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}; and
    vLLM's {"type": "structural_tag"}, either xgrammar's {"format": {...}} or the older
    {"structures": [{"begin", "schema", "end"}], "triggers": [...]}."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: dict[str, Any] | None = None
    format: dict[str, Any] | None = None
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None


class StructuredOutputsRequest(OpenAIModel):
    """vLLM's structured_outputs object: exactly one constraint."""

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    # vLLM's options of the grammar's JSON. meshserve's JSON grammars never allow free whitespace and allow no
    # properties the schema does not name, so the two disable_* options ask for what it does either way (vLLM's
    # xgrammar path ignores them per request too); a whitespace_pattern cannot be enforced: refused
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    @model_validator(mode="after")
    def _no_whitespace_pattern(self) -> StructuredOutputsRequest:
        if self.whitespace_pattern:
            raise ValueError("whitespace_pattern is not supported by this server (its JSON grammars allow no free "
                             "whitespace)")
        return self


class RepetitionDetection(OpenAIModel):
    """vLLM's repetition_detection (end the output on a repeated n-gram): not implemented, so only its off
    state (max_pattern_size 0) is accepted."""

    max_pattern_size: int = 0
    min_pattern_size: int = 0
    min_count: int = 0


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
# vLLM's vllm_xargs: free-form values for custom extensions (SamplingParams.extra_args)
XArgs = dict[str, str | int | float | list[str | int | float]]


class SamplingRequest(OpenAIModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX - 128)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1)
    # unset sampling fields take the model's generation_config.json defaults (--generation-config), as in vLLM
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100] added to its logit")
    allowed_token_ids: list[int] | None = Field(None, description="only these token ids may be sampled")
    bad_words: list[str] | None = Field(None, description="strings whose tokens must not be generated")
    truncate_prompt_tokens: int | None = Field(
        None, description="keep only the prompt's last N tokens (-1: max_model_len)")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                        description="logprobs of the prompt tokens and their top N alternatives")
    return_tokens_as_token_ids: bool = Field(
        False, description='logprob tokens as "token_id:N" (for tokens that are not valid text on their own)')
    # as vLLM's (and its fast detokenizer's): fast tokenizers put no spaces between special tokens either way
    spaces_between_special_tokens: bool = True
    truncation_side: Literal["left", "right"] | None = Field(
        None, description='truncate_prompt_tokens keeps the last N tokens ("left", the default); "right" (the '
                          'first N) is not supported')
    request_id: str | None = Field(None, description="vLLM's: the response's id is <prefix>-<request_id> "
                                                     "(a request id in flight may not be reused); an "
                                                     "X-Request-Id header names the request instead")
    _header_request_id: str | None = PrivateAttr(None)
    cache_salt: str | None = Field(None, min_length=1,
                                   description="vLLM's: prefix-cache entries are shared only between requests "
                                               "with the same salt (none: the unsalted ones)")
    vllm_xargs: XArgs | None = Field(None, description="vLLM's free-form values for custom extensions "
                                                       "(SamplingParams.extra_args; nothing built in reads them)")
    # vLLM ignores it on the generation endpoints (its /render endpoints answer it): so does meshserve
    return_token_offsets: bool | None = False
    # vLLM parameters not implemented: only their off values are accepted (a 400 names them otherwise)
    logprob_token_ids: list[int] | None = Field(None, description="not supported: must be absent or empty")
    thinking_token_budget: int | None = Field(None, ge=-1, description="not supported: absent, null or -1")
    repetition_detection: RepetitionDetection | None = Field(
        None, description="not supported: absent, or max_pattern_size 0")
    ec_transfer_params: dict[str, Any] | None = Field(None, description="not supported: text models only")
    # vLLM's beam search is not implemented: a request that turns it on is refused (400), not sampled instead
    use_beam_search: bool = Field(False, description="not supported: must be absent or false")
    length_penalty: float = Field(1.0, description="beam search only: not supported beyond 1")
    priority: int = Field(0, ge=_INT64_MIN, le=_INT64_MAX,
                          description="with --scheduling-policy priority: lower values are served first")
    kv_transfer_params: dict[str, Any] | None = Field(
        None, description="prefill/decode disaggregation (set by the router): do_remote_decode or "
                          "do_remote_prefill, transfer_id")
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # meshserve extension
    slo: ServiceLevel | None = None

    # fields vLLM types `X | None` (null: the default) and meshserve types plainly
    _NULLABLE: ClassVar[frozenset[str]] = frozenset({"n", "presence_penalty", "frequency_penalty", "stream",
                                                     "return_tokens_as_token_ids"})

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _nulls_as_unset(data, cls._NULLABLE)

    @field_validator("stop")
    @classmethod
    def _stop_strings_non_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids_non_negative(cls, v: list[int] | None) -> list[int] | None:
        if v and any(t < 0 for t in v):
            raise ValueError("stop_token_ids must be non-negative")
        return v

    @field_validator("allowed_token_ids")
    @classmethod
    def _allowed_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not v:
            raise ValueError("allowed_token_ids must not be empty (leave it out to allow every token)")
        if v and any(t < 0 for t in v):
            raise ValueError("allowed_token_ids must be non-negative")
        return v

    @field_validator("bad_words")
    @classmethod
    def _bad_words_non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v and any(not w.strip() for w in v):
            raise ValueError("bad_words must be non-blank strings")
        return v

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncation(cls, v: int | None) -> int | None:
        if v is not None and v < 1 and v != -1:
            raise ValueError(f"truncate_prompt_tokens must be >= 1, or -1 (max_model_len), got {v}")
        return v

    @field_validator("thinking_token_budget")
    @classmethod
    def _budget(cls, v: int | None) -> int | None:
        return None if v == -1 else v  # vLLM's "unlimited"

    def use_request_id_header(self, value: str | None):
        """The request's X-Request-Id header (None: not sent), which names it over the body's request_id (vLLM's
        _base_request_id, with or without --enable-request-id-headers)."""
        self._header_request_id = value
        return self

    def response_id(self, prefix: str) -> str:
        """The response's id, vLLM's way: <prefix>-<X-Request-Id header> when one was sent, else
        <prefix>-<request_id> when the body names one, else a random one."""
        if self._header_request_id is not None:
            return f"{prefix}-{self._header_request_id}"
        return f"{prefix}-{self.request_id or uuid.uuid4().hex}"

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:  # OpenAI's and vLLM's answer: not ignored
            raise ValueError("stream_options is only allowed when stream is true")
        return self


TokenIds = Annotated[list[int], Field(min_length=1)]
PromptText = Annotated[str, Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: PromptText | TokenIds | Annotated[list[PromptText | TokenIds], Field(min_length=1)]
    # 0 with echo: the prompt alone (vLLM's echo_without_generation); 0 without echo is a 400 (SamplingParams')
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM extension: each choice (each streamed chunk) carries the ids of its generated tokens, so a client
    # can re-send exactly what the model produced (multi-turn with token-id prompts, no tokenizer needed), and
    # its prompt's ids (a stream: in each choice's first chunk); with echo, the echoed text leaves the prompt out
    return_token_ids: bool = False
    # vLLM's: a text prompt is tokenized with the tokenizer's special tokens (e.g. BOS), unless false
    add_special_tokens: bool = True
    # OpenAI parameters not implemented: a request that uses them is refused (400), never answered differently
    suffix: str | None = Field(None, description="not supported: must be absent or empty")
    best_of: int | None = Field(None, description="not supported beyond best_of == n")
    prompt_embeds: str | list[str] | None = Field(None, description="vLLM's: not supported (text prompts and token "
                                                                    "ids only)")

    # a null max_tokens is its default, 16 (vLLM's normalize_null_max_tokens), not "up to the context's end"
    _NULLABLE: ClassVar[frozenset[str]] = SamplingRequest._NULLABLE | {"echo", "return_token_ids", "max_tokens"}

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_non_empty(cls, v):
        """Before the union's branches, so an empty prompt gets this sentence, not three branch errors."""
        if v == "" or (isinstance(v, list) and (not v or any(p == "" or p == [] for p in v))):
            raise ValueError("prompt must not be empty (nor any prompt of a batch)")
        return v

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: vLLM answers the prompt alone (one token is generated, and counted in usage,
        but neither its text nor its logprobs are sent)."""
        return self.echo and self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        """The batch: one entry per prompt (a string or a list of token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    # an earlier assistant turn's reasoning, for templates that render it (Qwen3's reasoning_content); vLLM
    # takes either name and hands the template both
    reasoning: str | None = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """vLLM's text parts (input_text, output_text, refusal, thinking, a bare string) as text parts; image,
        audio or file parts get one clear message naming them rather than three union-branch errors."""
        if isinstance(content, list):
            return text_parts(content)
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last (assistant) message stays open: generation continues it
    add_special_tokens: bool = Field(False, description="vLLM's: tokenize the rendered prompt with the tokenizer's "
                                                        "special tokens (e.g. BOS) added on top of what the chat "
                                                        "template wrote (most templates write their own)")
    # vLLM's: the answer starts with the last message's text when that message has the answer's role (a
    # continued assistant turn comes back whole)
    echo: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = Field(None, description="this request's Jinja chat template (vLLM's; the server "
                                                        "must trust them: --trust-request-chat-template)")
    documents: list[dict[str, Any]] | None = Field(None, description="vLLM's: documents the chat template may "
                                                                     "render (RAG templates: title and text)")
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # false: at most one call per turn (tool_choice "required" then yields one)
    include_reasoning: bool = True  # vLLM: false leaves the reasoning out (with --reasoning-parser)
    # vLLM's: handed to the chat template as reasoning_effort, and enable_thinking (effort != "none") unless
    # chat_template_kwargs sets it (the reasoning parser reads it there too)
    reasoning_effort: ReasoningEffort | None = None
    # vLLM's: the /render endpoints answer it; chat completions ignore it (as vLLM's)
    return_assistant_tokens_mask: bool = False
    # not implemented: only their empty / off values are accepted (a 400 names them otherwise)
    mm_processor_kwargs: dict[str, Any] | None = Field(None, description="not supported: text models only")
    media_io_kwargs: dict[str, dict[str, Any]] | None = Field(None, description="not supported: text models only")
    # vLLM's: each choice carries its generated ids (the raw ids, whatever the reasoning and tool parsers make of
    # the text; streamed: each chunk the ids of its delta) and the response the prompt's (streamed: in the role
    # chunks only, the first of each choice)
    return_token_ids: bool = False
    return_prompt_text: bool = Field(False, description="not supported: must be absent or false")
    # OpenAI's, which vLLM ignores: audio output and web search would change the answer, so they are refused
    audio: dict[str, Any] | None = Field(None, description="not supported: text output only")
    modalities: list[str] | None = Field(None, description='not supported beyond ["text"]')
    web_search_options: dict[str, Any] | None = Field(None, description="not supported: no web search")
    # the deprecated function-calling fields are not implemented: refused (400) rather than ignored
    functions: list[dict[str, Any]] | None = Field(None, description="not supported: must be absent or empty")
    function_call: str | dict[str, Any] | None = Field(None, description='not supported: absent or "none"')

    _NULLABLE: ClassVar[frozenset[str]] = SamplingRequest._NULLABLE | {"logprobs", "parallel_tool_calls",
                                                                       "return_token_ids", "return_prompt_text"}

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @model_validator(mode="after")
    def _reasoning_effort_to_template(self) -> ChatCompletionRequest:
        """vLLM's rule: the template gets reasoning_effort (over chat_template_kwargs' own), and enable_thinking
        unless the request's chat_template_kwargs set it."""
        if self.reasoning_effort is not None:
            kwargs = dict(self.chat_template_kwargs or {})
            kwargs.setdefault("enable_thinking", self.reasoning_effort != "none")
            kwargs["reasoning_effort"] = self.reasoning_effort
            self.chat_template_kwargs = kwargs
        return self


# -- responses --------------------------------------------------------------------------------------
FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class PromptTokensDetails(OpenAIModel):
    cached_tokens: int = 0


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class PromptLogprob(OpenAIModel):
    """vLLM's Logprob, one entry of a prompt position: {token id: {logprob, rank, decoded_token}}."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt position its token and top alternatives by id; None for the first
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionLogprobs(OpenAIModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


# Response shapes follow vLLM 0.26's JSON (tests/serve/test_response_shape_parity.py): a whole response carries
# every field of vLLM's model, null when unused (vLLM sends model_dump()); a stream chunk carries the fields
# vLLM's handlers set (it sends model_dump_json(exclude_unset=True)), nulls included where vLLM sets them.
class CompletionChoice(OpenAIModel):
    """A streamed /v1/completions choice (vLLM's CompletionResponseStreamChoice)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    # with prompt_logprobs only (vLLM puts them in each choice of the prompt's completions)
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=lambda v: v is None)
    prompt_token_ids: list[int] | None = None  # with return_token_ids (a stream: in each choice's first chunk)
    token_ids: list[int] | None = None  # with return_token_ids


class CompletionResponseChoice(CompletionChoice):
    """A whole /v1/completions choice (vLLM's CompletionResponseChoice): prompt_logprobs null when not asked."""

    prompt_logprobs: PromptLogprobs | None = None
    routed_experts: str | None = None  # vLLM's --enable-return-routed-experts: not supported, always null


def _now() -> int:
    return int(time.time())


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None  # vLLM's --fingerprint-mode none
    usage: UsageInfo | None = None
    # a prefill leg (kv_transfer_params do_remote_decode): its held KV's handle for the decode leg, as vLLM answers
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None  # vLLM's --enable-per-request-metrics: not supported, always null


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIModel):
    content: list[TokenLogprob] | None = None


class ChatResponseMessage(OpenAIModel):
    role: str = "assistant"  # --response-role
    content: str | None = None
    refusal: str | None = None
    annotations: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: FunctionCall | None = None
    # absent when there are none (vLLM drops an empty list)
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=lambda v: not v)
    reasoning: str | None = None  # with --reasoning-parser (vLLM's field)


class DeltaFunctionCall(OpenAIModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OpenAIModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # with return_token_ids
    routed_experts: str | None = None  # vLLM's --enable-return-routed-experts: not supported, always null


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None  # vLLM's --fingerprint-mode none
    usage: UsageInfo | None = None
    # with prompt_logprobs (vLLM puts them beside the choices: the prompt is shared)
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids
    prompt_text: str | None = None  # vLLM's return_prompt_text: not supported, always null
    # a prefill leg (kv_transfer_params do_remote_decode): its held KV's handle for the decode leg, as vLLM answers
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None  # vLLM's --enable-per-request-metrics: not supported, always null


class ChatDelta(OpenAIModel):
    role: str | None = None  # in the first chunk: --response-role
    content: str | None = None
    reasoning: str | None = Field(None, exclude_if=lambda v: v is None)  # with --reasoning-parser only
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(OpenAIModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # in the finishing chunk only, as vLLM's
    token_ids: list[int] | None = None  # with return_token_ids: the delta's (a role chunk has none, as vLLM's)

    @model_serializer(mode="wrap")
    def _as_vllm_sets_them(self, handler):
        data = handler(self)
        if self.finish_reason is None:
            data.pop("stop_reason", None)
        if self.delta.role is not None:
            data.pop("token_ids", None)
        return data


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = Field(None, exclude_if=lambda v: v is None)  # with include_usage
    # with return_token_ids: in the role chunks (each choice's first) only, as vLLM's; null in a role chunk without
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None  # vLLM's return_prompt_text: not supported, null in a role chunk

    @model_serializer(mode="wrap")
    def _as_vllm_sets_them(self, handler):
        data = handler(self)
        if not any(c.delta.role is not None for c in self.choices):
            data.pop("prompt_token_ids", None)
            data.pop("prompt_text", None)
        return data


class CompletionChunk(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = Field(None, exclude_if=lambda v: v is None)  # with include_usage


# -- tokenizer (vLLM's /tokenize and /detokenize) ---------------------------------------------------
class TokenizeRequest(OpenAIModel):
    """A text prompt, or a conversation rendered with the chat template (and its tools), to token ids."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # vLLM's defaults: true for a prompt, false for messages (the chat template writes its own special tokens)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[ChatTool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # with --trust-request-chat-template only
    return_token_strs: bool = False
    # vLLM's multimodal options of a conversation: text models only, so only empty ones are accepted
    mm_processor_kwargs: dict[str, Any] | None = Field(None, description="not supported: text models only")
    media_io_kwargs: dict[str, dict[str, Any]] | None = Field(None, description="not supported: text models only")

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _nulls_as_unset(data, frozenset({"return_token_strs"}))

    @field_validator("mm_processor_kwargs", "media_io_kwargs")
    @classmethod
    def _text_only(cls, v: dict | None, info) -> dict | None:
        if v:
            raise ValueError(f"{info.field_name} is not supported: this server runs text-only models")
        return v

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIModel):
    prompt: str


# -- models, health, version ------------------------------------------------------------------------
class ModelPermission(OpenAIModel):
    """vLLM's fixed permission entry of each model card."""

    id: str = Field(default_factory=lambda: f"modelperm-{uuid.uuid4().hex}")
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=_now)
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "meshserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class StatusResponse(OpenAIModel):
    status: str


class VersionResponse(OpenAIModel):
    version: str
