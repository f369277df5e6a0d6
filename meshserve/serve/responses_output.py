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
from meshserve.serve.reasoning.chat import ReasoningPlan
from meshserve.serve.responses_protocol import (
    IncompleteDetails,
    InputTokensDetails,
    ItemStatus,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputText,
    OutputTokensDetails,
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


def reasoning_tokens(plan: ReasoningPlan | None, token_ids: list[int]) -> int:
    """The output's tokens inside the reasoning span (the tags' own tokens not counted), as vLLM's
    count_reasoning_tokens reads them, but starting inside the span when the prompt opened it (vLLM counts none
    there), and a start tag inside the span not nesting (a model that writes <think> after its template
    did). A parser whose tags are not single tokens counts none, as vLLM's text parsers do."""
    if plan is None or not plan.parser.token_mode or not isinstance(plan.in_reasoning, bool):
        return 0  # (not a bool: deepseek_v3's "thinking off", where nothing is reasoning)
    start, end = plan.parser.start_id, plan.parser.end_id
    inside, count = plan.in_reasoning, 0
    for t in token_ids:
        if t == start or t == end:
            inside = t == start
        elif inside:
            count += 1
    return count


def response_usage(final: RequestOutput, plan: ReasoningPlan | None = None) -> ResponseUsage:
    u = usage_of([final])
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
    thought = reasoning_tokens(plan, list(final.outputs[0].token_ids)) if final.outputs else 0
    return ResponseUsage(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens,
                         total_tokens=u.total_tokens, input_tokens_details=InputTokensDetails(cached_tokens=cached),
                         output_tokens_details=OutputTokensDetails(reasoning_tokens=thought))


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
        previous_response_id=req.previous_response_id, reasoning=req.reasoning,
        service_tier=req.service_tier or "auto", max_tool_calls=req.max_tool_calls,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty)


def finished(base: ResponseObject, output: list[OutputItem], usage: ResponseUsage,
             incomplete: bool, kv_transfer_params: dict[str, Any] | None = None) -> ResponseObject:
    return base.model_copy(update={
        "status": "incomplete" if incomplete else "completed", "output": output, "usage": usage,
        "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None,
        "kv_transfer_params": kv_transfer_params})


def item_status(incomplete: bool, last: bool) -> ItemStatus:
    return "incomplete" if incomplete and last else "completed"
