"""Pydantic models of OpenAI's Responses API (POST /v1/responses): the request, its input items and tools,
and the response object with its output items. Shapes follow `openai.types.responses`, as vLLM serves them.

As in protocol.py, unknown fields are ignored and parameters that would change the answer but are not
implemented (conversation, prompt templates, background, tools other than functions, input other than text;
previous_response_id without a store) are refused with a 400 naming them. Input items and tools are checked
before their union is parsed, so a bad one gets one sentence naming its index and type rather than pydantic's
error per union branch.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from meshserve.serve.protocol import (
    _INT64_MAX,
    _INT64_MIN,
    MAX_LOGPROBS,
    OpenAIModel,
    ReasoningEffort,
    ServiceLevel,
    StructuredOutputsRequest,
    XArgs,
    _nulls_as_unset,
)


# -- input items ------------------------------------------------------------------------------------
class InputTextPart(OpenAIModel):
    """A text part of a message: input_text (any role) or output_text (assistant history, as the
    previous response's output items carry it)."""

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(OpenAIModel):
    type: Literal["message"] = "message"
    id: str | None = None  # the client's; input_items lists the item under it
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputTextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class FunctionCallItem(OpenAIModel):
    """A call the model made earlier (passed back as history)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None


class FunctionCallOutputItem(OpenAIModel):
    """The caller's result of a function call."""

    type: Literal["function_call_output"]
    id: str | None = None  # the client's; input_items lists the item under it
    call_id: str
    output: str | list[InputTextPart]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "\n".join(p.text for p in self.output)


class ReasoningItem(OpenAIModel):
    """A reasoning item of an earlier response, passed back as history: accepted and left out of the prompt
    (reasoning models' chat templates drop earlier turns' thinking)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    status: str | None = None


InputItem = Annotated[InputMessage | FunctionCallItem | FunctionCallOutputItem | ReasoningItem,
                      Field(discriminator="type")]
_INPUT_ITEM: TypeAdapter = TypeAdapter(InputItem)
_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
_PART_TYPES = ("input_text", "output_text")


def _check_items(items: list[Any]) -> list[Any]:
    """A message may leave out its type (OpenAI's EasyInputMessage); anything but text is refused by name."""
    if not items:
        raise ValueError("input must not be an empty list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"input items must be objects (input[{i}])")  # noqa: TRY004 - pydantic wants ValueError
        if "type" not in item and "role" in item:
            item = {**item, "type": "message"}
        kind = item.get("type")
        if kind not in _ITEM_TYPES:
            raise ValueError(f"items of type {kind!r} are not supported (input[{i}]): this server takes "
                             f"{', '.join(_ITEM_TYPES)} items")
        content = item.get("content") if kind == "message" else item.get("output") if kind != "reasoning" else None
        if isinstance(content, list):
            kinds = {p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content} - set(_PART_TYPES)
            if kinds:
                raise ValueError(f"content parts of type {', '.join(sorted(map(str, kinds)))} are not supported "
                                 f"(input[{i}]): this server takes input_text and output_text parts only")
        try:  # here, so a bad item's error names it (the str | list union would answer "not a string")
            _INPUT_ITEM.validate_python(item)
        except ValidationError as e:
            err = e.errors()[0]
            loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"][1:])  # [0]: the type tag
            raise ValueError(f"input[{i}]{loc}: {err['msg']}") from None
        out.append(item)
    return out


# -- tools ------------------------------------------------------------------------------------------
class FunctionTool(OpenAIModel):
    """A function tool in the Responses API's flat shape (no nested "function" object)."""

    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolChoice(OpenAIModel):
    type: Literal["function"]
    name: str


# -- text format (structured outputs) ---------------------------------------------------------------
_ABSENT = {"exclude_if": lambda v: v is None}  # echoed as sent: {"type": "text"} carries nothing else


class TextFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, **_ABSENT)
    schema_: dict[str, Any] | None = Field(None, alias="schema", **_ABSENT)
    description: str | None = Field(None, **_ABSENT)
    strict: bool | None = Field(None, **_ABSENT)


class TextConfig(OpenAIModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(None, **_ABSENT)


# -- request ----------------------------------------------------------------------------------------
# OpenAI's `include` values: an unknown one is a 400, as OpenAI's. Those of tools and inputs this server refuses,
# and encrypted reasoning (it has none), add nothing; output text logprobs are given (responses_logprobs.py).
Includable = Literal["file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
                     "message.input_image.image_url", "computer_call_output.output.image_url",
                     "code_interpreter_call.outputs", "reasoning.encrypted_content", "message.output_text.logprobs"]

class ResponsesRequest(OpenAIModel):
    """POST /v1/responses."""

    model: str | None = None
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None  # kept only with --responses-store-size (responses_store.py); default: as true
    # its effort goes to the chat template as vLLM's reasoning_effort (enable_thinking with it); the rest is ignored
    reasoning: dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None  # "auto" is accepted: a too-long input is a 400
    include: list[Includable] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="alternatives of each output text token (responses_logprobs.py)")
    # OpenAI parameters not implemented: a request that uses them is refused (400), never answered differently
    previous_response_id: str | None = Field(None, description="needs --responses-store-size (else a 400)")
    conversation: str | dict[str, Any] | None = Field(None, description="not supported: no conversation state")
    prompt: dict[str, Any] | None = Field(None, description="not supported: no stored prompt templates")
    background: bool | None = Field(None, description="not supported beyond false")
    # vLLM's sampling extensions of this endpoint
    seed: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX - 128)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    priority: int = Field(0, ge=_INT64_MIN, le=_INT64_MAX)
    # vLLM's further fields of this endpoint, with the chat endpoint's meaning (chat_fields)
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    include_reasoning: bool = True  # false: no reasoning item (with --reasoning-parser)
    structured_outputs: StructuredOutputsRequest | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: XArgs | None = None
    cache_salt: str | None = Field(None, min_length=1)
    request_id: str | None = Field(None, description="vLLM's: the response's id (a request id in flight may not be "
                                                     "reused)")
    # accepted and ignored, as vLLM ignores them (it only echoes max_tool_calls and service_tier: built-in tools'
    # loops and service tiers are not its, nor meshserve's)
    max_tool_calls: int | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    prompt_cache_key: str | None = None
    # vLLM parameters not implemented: only their empty / off values are accepted (a 400 names them otherwise)
    mm_processor_kwargs: dict[str, Any] | None = Field(None, description="not supported: text models only")
    media_io_kwargs: dict[str, dict[str, Any]] | None = Field(None, description="not supported: text models only")
    ec_transfer_params: dict[str, Any] | None = Field(None, description="not supported: text models only")
    enable_response_messages: bool = Field(False, description="not supported: no raw messages are returned")
    previous_input_messages: list[Any] | None = Field(None, description="not supported (harmony models' history): "
                                                                        "send input items")
    # meshserve extension
    slo: ServiceLevel | None = None

    # fields vLLM types `X | None` (null: the default) and meshserve types plainly
    _NULLABLE: ClassVar[frozenset[str]] = frozenset({"parallel_tool_calls", "stream"})

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _nulls_as_unset(data, cls._NULLABLE)

    @field_validator("mm_processor_kwargs", "media_io_kwargs", "ec_transfer_params", "enable_response_messages",
                     "previous_input_messages")
    @classmethod
    def _not_supported(cls, v: Any, info) -> Any:
        if v:
            raise ValueError(f"{info.field_name} is not supported by this server (text models, input items only)")
        return v

    @field_validator("reasoning")
    @classmethod
    def _effort(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        effort = (v or {}).get("effort")
        if effort is not None and effort not in get_args(ReasoningEffort):
            raise ValueError(f"reasoning.effort must be one of {', '.join(get_args(ReasoningEffort))}, got {effort!r}")
        return v

    def chat_fields(self) -> dict[str, Any]:
        """The fields the chat request that answers this one takes as they are (responses_input.py), None for
        those not given."""
        return {"logit_bias": self.logit_bias, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "skip_special_tokens": self.skip_special_tokens,
                "include_stop_str_in_output": self.include_stop_str_in_output,
                "include_reasoning": self.include_reasoning,
                "structured_outputs": self.structured_outputs.model_dump(by_alias=True, exclude_defaults=True)
                if self.structured_outputs is not None else None,
                "chat_template_kwargs": self.chat_template_kwargs, "kv_transfer_params": self.kv_transfer_params,
                "vllm_xargs": self.vllm_xargs, "cache_salt": self.cache_salt,
                "reasoning_effort": (self.reasoning or {}).get("effort")}

    @field_validator("input", mode="before")
    @classmethod
    def _known_items(cls, v: Any) -> Any:
        return _check_items(v) if isinstance(v, list) else v

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v  # not a list: pydantic's own 400 says so (iterating it here was a 500)
        for i, tool in enumerate(v):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tools of type {kind!r} are not supported (tools[{i}]): this server runs "
                                 "function tools only")
        return v

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice_only(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("type") != "function":
            raise ValueError(f"tool_choice of type {v.get('type')!r} is not supported: give \"none\", \"auto\", "
                             '"required" or {"type": "function", "name": ...}')
        return v


# -- response ---------------------------------------------------------------------------------------
class OutputText(OpenAIModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(OpenAIModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class OutputFunctionCall(OpenAIModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


class ReasoningText(OpenAIModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class OutputReasoning(OpenAIModel):
    """A reasoning model's thinking (`--reasoning-parser`), before the answer's items."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[ReasoningText]
    status: ItemStatus


OutputItem = Annotated[OutputMessage | OutputFunctionCall | OutputReasoning, Field(discriminator="type")]


class InputTokensDetails(OpenAIModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # OpenAI's explicit cache breakpoints, which this server has none of
    # vLLM's per-turn counts of its built-in tool loops; empty (as vLLM's for a plain model's one turn)
    input_tokens_per_turn: list[int] = Field(default_factory=list)
    cached_tokens_per_turn: list[int] = Field(default_factory=list)


class OutputTokensDetails(OpenAIModel):
    reasoning_tokens: int = 0  # the output's tokens inside the reasoning span (--reasoning-parser)
    # vLLM's: the tokens of its built-in tools' outputs, which this server runs none of
    tool_output_tokens: int = 0
    output_tokens_per_turn: list[int] = Field(default_factory=list)
    tool_output_tokens_per_turn: list[int] = Field(default_factory=list)


class ResponseUsage(OpenAIModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(OpenAIModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(OpenAIModel):
    code: str
    message: str


def _now() -> int:
    return int(time.time())


class ResponseObject(OpenAIModel):
    """The response: its output items and usage, and the request's settings echoed as OpenAI returns them."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=_now)  # whole seconds, as chat's `created`
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice = "auto"
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool = False  # whether this response is kept (only with a store)
    truncation: Literal["auto", "disabled"] = "disabled"
    previous_response_id: str | None = None
    background: bool = False
    # echoed as sent, as OpenAI and vLLM do (prompt is refused: always null)
    reasoning: dict[str, Any] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] = "auto"
    max_tool_calls: int | None = None
    prompt: dict[str, Any] | None = None
    # vLLM's: the penalties the request ran with, and a prefill's KV handle (disaggregated serving)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    kv_transfer_params: dict[str, Any] | None = None


class ResponseDeleted(OpenAIModel):
    """DELETE /v1/responses/{id}: OpenAI's confirmation."""

    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class InputItemList(OpenAIModel):
    """GET /v1/responses/{id}/input_items: a page of a kept response's input items (responses_items.py)."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
