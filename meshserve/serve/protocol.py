"""Pydantic models of the OpenAI-compatible HTTP API: requests, responses, stream chunks, errors.

This is the only module where pydantic appears. Field names follow OpenAI's API; vLLM's extensions
(top_k, min_p, repetition_penalty, ignore_eos, ...) are accepted too. Types are strict (a boolean is not an
integer, nor an integer a boolean). Unknown fields are ignored, as OpenAI's clients send some we do not
implement; OpenAI parameters that change the answer and that meshserve does not implement (functions,
suffix, ...) are declared so that a request using them gets a 400 naming them rather than a silently
different answer. Ranges here are the documented ones; SamplingParams validates again for callers
that bypass HTTP.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from meshserve.engine.chat_template import text_parts

MAX_LOGPROBS = 20
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


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
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM extension: each choice (each streamed chunk) carries the ids of its generated tokens, so a client
    # can re-send exactly what the model produced (multi-turn with token-id prompts, no tokenizer needed)
    return_token_ids: bool = False
    # OpenAI parameters not implemented: a request that uses them is refused (400), never answered differently
    suffix: str | None = Field(None, description="not supported: must be absent or empty")
    best_of: int | None = Field(None, description="not supported beyond best_of == n")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_non_empty(cls, v):
        """Before the union's branches, so an empty prompt gets this sentence, not three branch errors."""
        if v == "" or (isinstance(v, list) and (not v or any(p == "" or p == [] for p in v))):
            raise ValueError("prompt must not be empty (nor any prompt of a batch)")
        return v

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
    # the deprecated function-calling fields are not implemented: refused (400) rather than ignored
    functions: list[dict[str, Any]] | None = Field(None, description="not supported: must be absent or empty")
    function_call: str | dict[str, Any] | None = Field(None, description='not supported: absent or "none"')

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
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


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    # with return_token_ids only: absent otherwise, so other clients see OpenAI's shape
    token_ids: list[int] | None = Field(None, exclude_if=lambda v: v is None)
    # with prompt_logprobs only (vLLM puts them in each choice of the prompt's completions)
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=lambda v: v is None)


def _now() -> int:
    return int(time.time())


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    # a prefill leg (kv_transfer_params do_remote_decode): its held KV's handle for the decode leg, as vLLM answers
    kv_transfer_params: dict[str, Any] | None = Field(None, exclude_if=lambda v: v is None)


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
    # with --reasoning-parser only (vLLM's field): absent otherwise, so responses keep OpenAI's shape
    reasoning: str | None = Field(None, exclude_if=lambda v: v is None)
    tool_calls: list[ToolCall] | None = None


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


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    # with prompt_logprobs only (vLLM puts them beside the choices: the prompt is shared)
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=lambda v: v is None)
    # a prefill leg (kv_transfer_params do_remote_decode): its held KV's handle for the decode leg, as vLLM answers
    kv_transfer_params: dict[str, Any] | None = Field(None, exclude_if=lambda v: v is None)


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
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChunk(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


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
class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "meshserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class StatusResponse(OpenAIModel):
    status: str


class VersionResponse(OpenAIModel):
    version: str
