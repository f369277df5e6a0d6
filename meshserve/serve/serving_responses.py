"""POST /v1/responses: OpenAI's Responses API over the chat endpoint's path (responses_input.py turns the
request into its chat request; ChatService.start checks, renders and starts it), answered as one response
object or as its event stream (responses_stream.py). Nothing is stored: previous_response_id is refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.responses import Response

from meshserve.outputs import RequestOutput
from meshserve.serve.metrics import RequestTracker, outcome_of
from meshserve.serve.responses_input import chat_request_of, in_responses_terms
from meshserve.serve.responses_output import (
    finished,
    function_call_item,
    in_progress,
    item_status,
    message_item,
    new_item_id,
    response_usage,
)
from meshserve.serve.responses_protocol import OutputItem, ResponseObject, ResponsesRequest
from meshserve.serve.responses_stream import ResponseEvents
from meshserve.serve.serving_chat import ChatService, ChatStart
from meshserve.serve.serving_common import StreamState, accumulate, collect_outputs
from meshserve.serve.streaming import SSEResponse
from meshserve.serve.tool_call_stream import ToolCallStream


class ResponsesService:
    def __init__(self, chat: ChatService):
        self.chat = chat

    async def create(self, req: ResponsesRequest) -> Response | ResponseObject:
        tracker = self.chat.metrics.track()
        response_id = new_item_id("resp")
        try:
            started = await self.chat.start(chat_request_of(req), tracker, response_id)
        except BaseException as e:
            tracker.fail(e)
            in_responses_terms(e)
            raise
        base = in_progress(req, response_id, started.model, started.params)
        if req.stream:
            return SSEResponse(self._stream(base, started, tracker))
        return await self._whole(base, started, tracker)

    async def _whole(self, base: ResponseObject, started: ChatStart, tracker: RequestTracker) -> ResponseObject:
        try:
            (final,) = await collect_outputs([started.request], tracker)
        finally:
            await started.request.aclose()
        tracker.finish(outcome_of([final]))
        c = final.outputs[0]
        incomplete = c.finish_reason == "length"
        content, calls = started.plan.extract(c.text)
        output: list[OutputItem] = []
        if content or not calls:  # no call: the message, even an empty one
            output.append(message_item(content or "", item_status(incomplete, last=not calls)))
        for k, call in enumerate(calls):
            output.append(function_call_item(call.id, call.function.name, call.function.arguments,
                                             item_status(incomplete, last=k == len(calls) - 1)))
        return finished(base, output, response_usage(final), incomplete)

    async def _stream(self, base: ResponseObject, started: ChatStart,
                      tracker: RequestTracker) -> AsyncIterator[str]:
        plan, request = started.plan, started.request
        events = ResponseEvents(base)
        state = StreamState(every_token=not self.chat.client.has_tokenizer)
        calls = ToolCallStream(plan) if plan.mode != "none" else None
        final: RequestOutput | None = None
        outcome = "abort"
        try:
            for e in events.start():
                yield e
            async for out in request:
                tracker.observe(0, out)
                final = accumulate(final, out)
                for c in out.outputs:
                    d = state.delta(0, c, need_tokens=calls is not None)
                    if d is None:
                        continue
                    if calls is None:
                        content, deltas = d.text, []
                    elif d.finish_reason:
                        content, deltas, _ = calls.finish(final.outputs[0].text)
                    else:
                        content, deltas = calls.step(final.outputs[0].text)
                    for e in events.text(content):
                        yield e
                    for delta in deltas:
                        for e in events.call(delta):
                            yield e
            assert final is not None
            outcome = outcome_of([final])
            for e in events.finish(response_usage(final), final.outputs[0].finish_reason == "length"):
                yield e
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
            outcome = "error"
            for event in events.fail(e):
                yield event
        finally:
            tracker.finish(outcome)
            await request.aclose()
