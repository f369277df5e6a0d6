"""The Responses API's event stream, as OpenAI sends it and its SDK parses it (`ResponseStreamEvent`).

Each event is `event: <type>` plus `data: {"type", ..., "sequence_number"}` with numbers from 0 up; there is
no `[DONE]`: response.completed (or .incomplete, or .failed after an error) is the last event and carries the
whole response. Items come one after another: with --reasoning-parser the reasoning first, as a reasoning item
(its text as response.reasoning_text.delta events); text opens an assistant message (output_item.added,
content_part.added, then output_text.delta events); a tool call closes it (output_text.done,
content_part.done, output_item.done) and opens a function_call item whose arguments arrive as
function_call_arguments.delta events. The items built here are the ones the final response carries, so
their ids and texts agree with what was streamed. With logprobs asked (responses_logprobs.py) each
output_text.delta carries those of the tokens that wrote its text, output_text.done the whole part's.
"""

from __future__ import annotations

from typing import Any

from meshserve.serve.errors import error_payload
from meshserve.serve.protocol import DeltaToolCall
from meshserve.serve.responses_logprobs import TextLogprobs
from meshserve.serve.responses_output import (
    finished,
    function_call_item,
    item_status,
    message_item,
    reasoning_item,
)
from meshserve.serve.responses_protocol import (
    OutputFunctionCall,
    OutputMessage,
    OutputReasoning,
    OutputText,
    ReasoningText,
    ResponseError,
    ResponseObject,
    ResponseUsage,
)
from meshserve.serve.streaming import sse_event

TERMINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")


def _dump(model) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True)


class ResponseEvents:
    """One response's events: the sequence numbers, and its output items as far as they are written."""

    def __init__(self, base: ResponseObject, logprobs: TextLogprobs | None = None):
        self.base = base
        self.logprobs = logprobs  # the output's token logprobs, when asked for
        self.sequence_number = 0
        self.items: list[OutputMessage | OutputFunctionCall | OutputReasoning] = []
        self.thought: OutputReasoning | None = None  # the reasoning being written, if any
        # whitespace before any message: held, since the whole response drops it before a tool call
        self.pending_space = ""
        self.message: OutputMessage | None = None  # the message being written, if any
        self.calls: dict[int, OutputFunctionCall] = {}  # the tool-call stream's index -> its item
        self.open_call: OutputFunctionCall | None = None
        self.response: ResponseObject | None = None  # the whole response, once finished

    def _event(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, **fields, "sequence_number": self.sequence_number}
        self.sequence_number += 1
        return f"event: {kind}\n{sse_event(body)}"

    def _index(self, item) -> int:
        return next(i for i, it in enumerate(self.items) if it is item)

    def start(self) -> list[str]:
        return [self._event("response.created", response=_dump(self.base)),
                self._event("response.in_progress", response=_dump(self.base))]

    # -- reasoning -------------------------------------------------------------------------------
    def reasoning(self, delta: str | None) -> list[str]:
        """Reasoning text (--reasoning-parser): its own item, before the answer's."""
        if not delta:
            return []
        events: list[str] = []
        if self.thought is None:
            self.thought = reasoning_item(None, "in_progress")
            events += self._open_text_item(self.thought, ReasoningText(text=""))
        self.thought.content[0].text += delta
        events.append(self._event("response.reasoning_text.delta", item_id=self.thought.id,
                                  output_index=self._index(self.thought), content_index=0, delta=delta))
        return events

    def _close_reasoning(self, incomplete: bool) -> list[str]:
        r, self.thought = self.thought, None
        return [] if r is None else self._close_text_item(r, incomplete, "response.reasoning_text.done")

    # -- items of one text part (a message, a reasoning item) ---------------------------------------
    def _open_text_item(self, item: OutputMessage | OutputReasoning, part: OutputText | ReasoningText) -> list[str]:
        """A new item (announced empty), then its one text part."""
        self.items.append(item)
        index = len(self.items) - 1
        added = self._event("response.output_item.added", output_index=index, item=_dump(item))
        item.content.append(part)
        return [added, self._event("response.content_part.added", item_id=item.id, output_index=index,
                                   content_index=0, part=_dump(part))]

    def _close_text_item(self, item: OutputMessage | OutputReasoning, incomplete: bool, done: str,
                         **fields: Any) -> list[str]:
        """The text's done event (`done`), the part's and the item's."""
        index = self._index(item)
        item.status = item_status(incomplete, last=index == len(self.items) - 1)
        part = item.content[0]
        return [self._event(done, item_id=item.id, output_index=index, content_index=0, text=part.text, **fields),
                self._event("response.content_part.done", item_id=item.id, output_index=index, content_index=0,
                            part=_dump(part)),
                self._event("response.output_item.done", output_index=index, item=_dump(item))]

    # -- text ------------------------------------------------------------------------------------
    def _open_message(self) -> list[str]:
        events = self._close_reasoning(incomplete=False) + self._close_call(incomplete=False)
        self.message = message_item(None, "in_progress")
        return events + self._open_text_item(self.message, OutputText(text=""))

    def text(self, delta: str | None, hold_space: bool = True) -> list[str]:
        if not delta:
            return []
        if self.message is None:
            if hold_space and not (self.pending_space + delta).strip():
                self.pending_space += delta
                return []
            delta, self.pending_space = self.pending_space + delta, ""
        events = self._open_message() if self.message is None else []
        assert self.message is not None
        part = self.message.content[0]
        part.text += delta
        logprobs = self.logprobs.take(len(part.text)) if self.logprobs is not None else []
        part.logprobs += logprobs
        events.append(self._event("response.output_text.delta", item_id=self.message.id,
                                  output_index=self._index(self.message), content_index=0, delta=delta,
                                  logprobs=logprobs))
        return events

    def _close_message(self, incomplete: bool) -> list[str]:
        m, self.message = self.message, None
        return [] if m is None else self._close_text_item(m, incomplete, "response.output_text.done",
                                                          logprobs=m.content[0].logprobs)

    # -- tool calls ------------------------------------------------------------------------------
    def call(self, delta: DeltaToolCall) -> list[str]:
        events: list[str] = []
        item = self.calls.get(delta.index)
        if item is None:  # a call's first delta carries its id and name (tool_call_stream.py)
            self.pending_space = ""
            events += (self._close_reasoning(incomplete=False) + self._close_message(incomplete=False)
                       + self._close_call(incomplete=False))
            item = function_call_item(delta.id or "", delta.function.name or "", "", "in_progress")
            self.calls[delta.index] = self.open_call = item
            self.items.append(item)
            events.append(self._event("response.output_item.added", output_index=len(self.items) - 1,
                                      item=_dump(item)))
        if delta.function.arguments:
            item.arguments += delta.function.arguments
            events.append(self._event("response.function_call_arguments.delta", item_id=item.id,
                                      output_index=self._index(item), delta=delta.function.arguments))
        return events

    def _close_call(self, incomplete: bool) -> list[str]:
        item = self.open_call
        if item is None:
            return []
        self.open_call = None
        index = self._index(item)
        item.status = item_status(incomplete, last=index == len(self.items) - 1)
        # name: as OpenAI's API reference and vLLM send it (the SDK's type does not list it, and keeps it)
        return [self._event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                            name=item.name, arguments=item.arguments),
                self._event("response.output_item.done", output_index=index, item=_dump(item))]

    # -- the end ---------------------------------------------------------------------------------
    def finish(self, usage: ResponseUsage, incomplete: bool,
               kv_transfer_params: dict[str, Any] | None = None) -> list[str]:
        """Close what is open and send the whole response. An answer with no item at all still gets its
        (empty) message, as the whole response does; whitespace held back with no call after it was text."""
        space, self.pending_space = self.pending_space, ""  # text() prepends what is pending: pass it once
        events = self.text(space, hold_space=False) if not self.calls else []
        if not self.items:
            events += self._open_message()
        events += self._close_reasoning(incomplete) + self._close_message(incomplete) + self._close_call(incomplete)
        response = self.response = finished(self.base, list(self.items), usage, incomplete, kv_transfer_params)
        kind = "response.incomplete" if incomplete else "response.completed"
        return [*events, self._event(kind, response=_dump(response))]

    def fail(self, exc: BaseException) -> list[str]:
        """After an error the status line is gone: an error event, then the failed response (with what was
        written) as the last event."""
        error = error_payload(exc)[1]["error"]
        failed = self.base.model_copy(update={
            "status": "failed", "output": list(self.items),
            "error": ResponseError(code="server_error", message=error["message"])})
        code = None if error["code"] is None else str(error["code"])
        return [self._event("error", code=code, message=error["message"], param=error["param"]),
                self._event("response.failed", response=_dump(failed))]
