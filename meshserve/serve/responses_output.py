"""The Responses API's output: items (an assistant message, function calls), usage, and the response object
at its start (in progress, the request's settings echoed) and at its end. The whole response and the
event stream build theirs here, so both carry the same shapes.

When the length limit cuts the answer the response is "incomplete" (reason max_output_tokens) and so is
its last item: the one that was being written.
"""

from __future__ import annotations

import uuid
from typing import Any

from meshserve.outputs import RequestOutput
from meshserve.sampling import SamplingParams
from meshserve.serve.responses_protocol import (
    IncompleteDetails,
    InputTokensDetails,
    ItemStatus,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputText,
    ReasoningText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    TextConfig,
    TextFormat,
)
from meshserve.serve.serving_common import usage_of


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(text: str | None, status: ItemStatus,
                 logprobs: list[dict[str, Any]] | None = None) -> OutputMessage:
    """An assistant message; text None: opened, nothing written yet (the stream's output_item.added)."""
    return OutputMessage(id=new_item_id("msg"), status=status,
                         content=[] if text is None else [OutputText(text=text, logprobs=logprobs or [])])


def reasoning_item(text: str | None, status: ItemStatus) -> OutputReasoning:
    """The reasoning of a --reasoning-parser server; text None: opened, nothing written yet."""
    return OutputReasoning(id=new_item_id("rs"), status=status,
                           content=[] if text is None else [ReasoningText(text=text)])


def function_call_item(call_id: str, name: str, arguments: str, status: ItemStatus) -> OutputFunctionCall:
    return OutputFunctionCall(id=new_item_id("fc"), call_id=call_id, name=name, arguments=arguments, status=status)


def response_usage(final: RequestOutput) -> ResponseUsage:
    u = usage_of([final])
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
    return ResponseUsage(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens,
                         total_tokens=u.total_tokens, input_tokens_details=InputTokensDetails(cached_tokens=cached))


def in_progress(req: ResponsesRequest, response_id: str, model: str, params: SamplingParams,
                stored: bool = False) -> ResponseObject:
    """The response as it starts: no output yet; the settings it runs with (sampling as resolved)."""
    return ResponseObject(
        id=response_id, status="in_progress", model=model, instructions=req.instructions,
        max_output_tokens=req.max_output_tokens, temperature=params.temperature, top_p=params.top_p,
        top_logprobs=req.top_logprobs,
        tools=req.tools or [], tool_choice=req.tool_choice if req.tool_choice is not None else "auto",
        parallel_tool_calls=req.parallel_tool_calls,
        text=req.text if req.text is not None and req.text.format is not None
        else TextConfig(format=TextFormat(type="text")),
        metadata=req.metadata, user=req.user, truncation=req.truncation or "disabled", store=stored,
        previous_response_id=req.previous_response_id)


def finished(base: ResponseObject, output: list[OutputItem], usage: ResponseUsage,
             incomplete: bool) -> ResponseObject:
    return base.model_copy(update={
        "status": "incomplete" if incomplete else "completed", "output": output, "usage": usage,
        "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None})


def item_status(incomplete: bool, last: bool) -> ItemStatus:
    return "incomplete" if incomplete and last else "completed"
