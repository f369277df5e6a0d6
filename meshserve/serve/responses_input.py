"""A Responses API request as the chat completion it amounts to, so /v1/responses runs the chat endpoint's
own checks, tool plan, structured outputs, sampling defaults and template (one path, not two).

instructions become a system message first, then come the conversation of a stored previous response (if
previous_response_id names one) and the input: a string is one user message; function_call items join the
assistant turn before them (or make one) as tool_calls, function_call_output items become tool messages.
Errors raised on the chat request name the chat fields; `in_responses_terms` renames them back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from meshserve.errors import InvalidArgumentError
from meshserve.serve.protocol import ChatCompletionRequest
from meshserve.serve.responses_logprobs import wants_logprobs
from meshserve.serve.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    InputMessage,
    ResponsesRequest,
)


def reject_unsupported(req: ResponsesRequest) -> None:
    """A 400 naming a Responses parameter that would change the answer and that meshserve does not implement."""
    if req.conversation is not None:
        raise InvalidArgumentError("conversation is not supported: this server keeps no conversation state; send "
                                   "the whole conversation as input items", param="conversation")
    if req.prompt is not None:
        raise InvalidArgumentError("prompt (a stored prompt template) is not supported: send instructions and input",
                                   param="prompt")
    if req.background:
        raise InvalidArgumentError("background is not supported: responses are not stored to be polled",
                                   param="background")


def input_items(req: ResponsesRequest) -> list[InputItem]:
    """The request's input as items: a string is one user message."""
    return [InputMessage(role="user", content=req.input)] if isinstance(req.input, str) else list(req.input)


def chat_messages(req: ResponsesRequest, earlier: list[InputItem]) -> list[dict[str, Any]]:
    """instructions, the conversation before (a stored previous response's), then the request's input."""
    messages: list[dict[str, Any]] = []
    if req.instructions is not None:
        messages.append({"role": "system", "content": req.instructions})
    for item in [*earlier, *input_items(req)]:
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # calls of one turn: one assistant message
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        # a reasoning item is left out: reasoning models' templates drop earlier turns' thinking
    return messages


def _response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    spec = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description}
    return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}


def chat_request_of(req: ResponsesRequest, earlier: Sequence[InputItem] = ()) -> ChatCompletionRequest:
    """The chat request that answers this Responses request, after the conversation `earlier` (checked: a 400
    names what is not supported)."""
    reject_unsupported(req)
    tool_choice: Any = req.tool_choice
    if tool_choice is not None and not isinstance(tool_choice, str):
        tool_choice = {"type": "function", "function": {"name": tool_choice.name}}
    fields = {
        "model": req.model,
        "messages": chat_messages(req, list(earlier)),
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "user": req.user,
        "tools": [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                  for t in req.tools] if req.tools else None,
        "tool_choice": tool_choice,
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": _response_format(req),
        "seed": req.seed,
        # every output token's logprob: the message's own are picked out of them (responses_logprobs.py)
        "logprobs": wants_logprobs(req) or None,
        "top_logprobs": req.top_logprobs if wants_logprobs(req) else None,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "stop": req.stop,
        "ignore_eos": req.ignore_eos,
        "priority": req.priority,
        "slo": req.slo.model_dump(exclude_none=True) if req.slo is not None else None,
        **req.chat_fields(),  # vLLM's further fields, which mean here what they mean to chat
    }
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:  # what the Responses model let through but chat's does not
        first = e.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        if loc.startswith("messages"):  # the messages come from the items, not one to one: the input as a whole
            loc = "messages"
        raise in_responses_terms(InvalidArgumentError(f"{loc}: {first['msg']}", param=loc)) from None


# chat field -> the Responses field it came from (longest first: "response_format.json_schema" before its parent)
_RENAMES = [
    (re.compile(r"\bresponse_format\.json_schema\.schema\b"), "text.format.schema"),
    (re.compile(r"\bresponse_format\.json_schema\b"), "text.format"),
    (re.compile(r"\bresponse_format\b"), "text.format"),
    (re.compile(r"\b(tools\[\d+\])\.function\."), r"\1."),
    (re.compile(r"\bmax_completion_tokens\b|\bmax_tokens\b"), "max_output_tokens"),
    (re.compile(r"\bmessages\b"), "input"),
    (re.compile(r"^prompt$"), "input"),  # the rendered conversation (too long): Responses' "prompt" is a template
]


def in_responses_terms(exc: BaseException) -> BaseException:
    """An error raised on the chat request, renamed to the Responses fields the client sent."""
    if not isinstance(exc, InvalidArgumentError):
        return exc
    for pattern, name in _RENAMES:
        if exc.param:
            exc.param = pattern.sub(name, exc.param)
        if pattern.pattern.startswith("^"):
            continue  # a whole param's name only, not words of the message
        exc.args = tuple(pattern.sub(name, a) if isinstance(a, str) else a for a in exc.args)
    return exc
