"""POST /v1/responses: OpenAI's Responses API over the chat endpoint's path (responses_input.py turns the
request into its chat request; ChatService.start checks, renders and starts it), answered as one response
object or as its event stream (responses_stream.py). With a store (--responses-store-size, responses_store.py)
finished responses are kept for previous_response_id, GET and DELETE /v1/responses/{id} and its input_items;
without one nothing is kept and previous_response_id is a 400."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Literal, NoReturn

from starlette.responses import Response

from meshserve.errors import InvalidArgumentError, ResponseNotFoundError
from meshserve.outputs import RequestOutput
from meshserve.serve.metrics import RequestTracker, outcome_of
from meshserve.serve.responses_input import chat_request_of, in_responses_terms, input_items
from meshserve.serve.responses_items import input_item_list
from meshserve.serve.responses_logprobs import TextLogprobs, message_start
from meshserve.serve.responses_output import (
    finished,
    function_call_item,
    in_progress,
    item_status,
    message_item,
    new_item_id,
    reasoning_item,
    response_usage,
)
from meshserve.serve.responses_protocol import (
    InputItem,
    InputItemList,
    OutputItem,
    ResponseDeleted,
    ResponseObject,
    ResponsesRequest,
)
from meshserve.serve.responses_store import PreviousResponseNotFoundError, ResponseStore, StoredResponse
from meshserve.serve.responses_stream import ResponseEvents
from meshserve.serve.serving_chat import ChatService, ChatStart
from meshserve.serve.serving_common import StreamState, accumulate, collect_outputs
from meshserve.serve.streaming import SSEResponse
from meshserve.serve.tool_call_stream import ToolCallStream


class ResponsesService:
    def __init__(self, chat: ChatService, store: ResponseStore | None = None):
        self.chat = chat
        self.store = store

    def _stored(self, response_id: str) -> StoredResponse:
        stored = self.store.get(response_id) if self.store is not None else None
        if stored is None:
            raise ResponseNotFoundError(response_id)
        return stored

    def retrieve(self, response_id: str) -> ResponseObject:
        return self._stored(response_id).response

    def input_items(self, response_id: str, after: str | None, limit: int,
                    order: Literal["asc", "desc"]) -> InputItemList:
        return input_item_list(self._stored(response_id), after, limit, order)

    def delete(self, response_id: str) -> ResponseDeleted:
        if self.store is None or not self.store.delete(response_id):
            raise ResponseNotFoundError(response_id)
        return ResponseDeleted(id=response_id)

    def cancel(self, response_id: str) -> NoReturn:
        """OpenAI cancels background responses only; this server runs none (background is a 400), so a kept
        response has finished: a 400 that says so, rather than the 404 of a route that is not there."""
        self.retrieve(response_id)
        raise InvalidArgumentError(f"response {response_id!r} cannot be cancelled: only background responses can, "
                                   "and this server runs none (every response is answered before it is kept)",
                                   param="response_id")

    def _earlier(self, req: ResponsesRequest) -> list[InputItem]:
        """The conversation that previous_response_id continues (none without it)."""
        if req.previous_response_id is None:
            return []
        if self.store is None:
            raise PreviousResponseNotFoundError(
                "previous_response_id is not supported: this server does not store responses (store is accepted "
                "and ignored; `meshserve serve --responses-store-size N` keeps the last N); send the whole "
                "conversation as input items")
        return self.store.conversation_before(req.previous_response_id)

    async def create(self, req: ResponsesRequest) -> Response | ResponseObject:
        tracker = self.chat.metrics.track()
        response_id = req.request_id or new_item_id("resp")  # vLLM's request_id names the response
        try:
            earlier = self._earlier(req)
            chat_req = chat_request_of(req, earlier)  # its errors are in Responses terms already
            try:
                started = await self.chat.start(chat_req, tracker, response_id)
            except InvalidArgumentError as e:
                in_responses_terms(e)  # named in the chat request's terms: renamed back
                raise
        except BaseException as e:
            tracker.fail(e)
            raise
        keep = self.store is not None and req.store is not False  # OpenAI's default is to store
        base = in_progress(req, response_id, started.model, started.params, stored=keep)
        conversation = [*earlier, *input_items(req)] if keep else None
        logprobs = TextLogprobs(chat_req.top_logprobs or 0) if chat_req.logprobs else None
        if req.stream:
            return SSEResponse(self._stream(base, started, tracker, conversation, logprobs))
        return self._kept(await self._whole(base, started, tracker, logprobs), conversation)

    def _kept(self, response: ResponseObject, conversation: list[InputItem] | None) -> ResponseObject:
        if conversation is not None and self.store is not None:
            self.store.put(response, conversation)
        return response

    async def _whole(self, base: ResponseObject, started: ChatStart, tracker: RequestTracker,
                     logprobs: TextLogprobs | None) -> ResponseObject:
        try:
            (final,) = await collect_outputs([started.request], tracker)
        finally:
            await started.request.aclose()
        tracker.finish(outcome_of([final]))
        c = final.outputs[0]
        incomplete = c.finish_reason == "length"
        thought, content, calls = started.read(c)
        output: list[OutputItem] = []
        if thought:
            output.append(reasoning_item(thought, item_status(incomplete, last=not (content or calls))))
        if content or not (calls or thought):  # the message; an empty one when nothing else was written
            entries = None
            if logprobs is not None and content:  # the tokens of the message's text alone
                logprobs.add(c.token_ids, c.logprobs)
                after = (started.reasoning.split(c.text, c.token_ids)[1] or "") if started.reasoning else None
                logprobs.start = message_start(c.text, after, content)
                entries = logprobs.take(len(content))
            output.append(message_item(content or "", item_status(incomplete, last=not calls), entries))
        for k, call in enumerate(calls):
            output.append(function_call_item(call.id, call.function.name, call.function.arguments,
                                             item_status(incomplete, last=k == len(calls) - 1)))
        return finished(base, output, response_usage(final, started.reasoning), incomplete,
                        final.kv_transfer_params)

    async def _stream(self, base: ResponseObject, started: ChatStart, tracker: RequestTracker,
                      conversation: list[InputItem] | None, logprobs: TextLogprobs | None) -> AsyncIterator[str]:
        plan, request = started.plan, started.request
        events = ResponseEvents(base, logprobs)
        state = StreamState(every_token=not self.chat.client.has_tokenizer)
        calls = ToolCallStream(plan) if plan.mode != "none" else None
        thinking = started.reasoning.stream() if started.reasoning else None
        final: RequestOutput | None = None
        kv_transfer_params: dict | None = None
        outcome = "abort"
        try:
            for e in events.start():
                yield e
            async for out in request:
                tracker.observe(0, out)
                final = accumulate(final, out)
                kv_transfer_params = out.kv_transfer_params or kv_transfer_params  # (accumulate drops it)
                for c in out.outputs:
                    if logprobs is not None:
                        logprobs.add(c.token_ids, c.logprobs)  # c is this step's delta
                    d = state.delta(0, c, need_tokens=calls is not None or thinking is not None)
                    if d is None:
                        continue
                    text, so_far = d.text, final.outputs[0].text
                    if thinking is not None:  # the reasoning goes out as it comes; tools read the content after it
                        thought, text = thinking.step(d.text, d.token_ids, d.finish_reason is not None)
                        so_far = thinking.content
                        for e in events.reasoning(thought):
                            yield e
                    if calls is None or (thinking is not None and not so_far):
                        content, deltas = text, []  # tools read the content: none yet while it thinks
                    elif d.finish_reason:
                        content, deltas, _ = calls.finish(so_far)
                    else:
                        content, deltas = calls.step(so_far)
                    if logprobs is not None and logprobs.start is None and content:
                        # the message's text is a prefix of so_far, which ends the output so far
                        logprobs.start = len(final.outputs[0].text) - len(so_far)
                    for e in events.text(content):
                        yield e
                    for delta in deltas:
                        for e in events.call(delta):
                            yield e
            assert final is not None
            outcome = outcome_of([final])
            last = events.finish(response_usage(final, started.reasoning), final.outputs[0].finish_reason == "length",
                                 kv_transfer_params)
            assert events.response is not None
            self._kept(events.response, conversation)  # before the last event: a client may continue at once
            for e in last:
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
