"""`--responses-store-size N`: the last N responses answered with `store` (OpenAI's default), kept in this API
process's memory, so that a request may continue one by `previous_response_id`, GET /v1/responses/{id}
returns it and .../input_items its input, and DELETE forgets it. Off by default (as vLLM's store): nothing is
kept and previous_response_id is a 400.

What is kept of a response is its conversation as input items (the previous conversation, this request's
input, its output as assistant messages and function calls) without its instructions, which OpenAI does not
carry over to the next response either. The least recently used response goes first once N are kept; a
restart forgets them all, and another API process or replica has its own (the CLI refuses the flag with
several API processes).

Each kept item has an id (GET .../input_items lists them, and pages by them): the one the client gave it, the
output item's own for the response's output, else one made from the response's id and the item's place. An
item of the conversation before keeps the id the previous response gave it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from meshserve.errors import InvalidArgumentError
from meshserve.serve.responses_protocol import (
    FunctionCallItem,
    InputItem,
    InputMessage,
    InputTextPart,
    OutputFunctionCall,
    OutputReasoning,
    ResponseObject,
)


class PreviousResponseNotFoundError(InvalidArgumentError):
    """previous_response_id names no kept response: OpenAI's 400 with its code, which clients such as Codex
    read to resend the whole conversation instead."""

    code = "previous_response_not_found"

    def __init__(self, message: str):
        super().__init__(message, param="previous_response_id")


_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


@dataclass
class StoredResponse:
    response: ResponseObject
    conversation: list[InputItem]  # its input (after the previous conversation) and its output, as input items
    num_input_items: int = 0  # how many of them came before its output (GET .../input_items lists those)
    item_ids: list[str] = field(default_factory=list)  # each conversation item's id, in the same order


def _output_items(response: ResponseObject) -> list[tuple[str, InputItem]]:
    """A response's output items as the input items that send them back (assistant history), with their ids."""
    items: list[tuple[str, InputItem]] = []
    for item in response.output:
        if isinstance(item, OutputFunctionCall):
            items.append((item.id, FunctionCallItem(type="function_call", call_id=item.call_id, name=item.name,
                                                    arguments=item.arguments, id=item.id)))
        elif isinstance(item, OutputReasoning):
            continue  # the next turn's prompt leaves earlier thinking out (responses_input.chat_messages)
        else:
            items.append((item.id, InputMessage(role="assistant", content=[
                InputTextPart(type="output_text", text=part.text) for part in item.content])))
    return items


class ResponseStore:
    """At most max_size responses by id, the least recently used dropped first."""

    def __init__(self, max_size: int):
        if max_size < 1:
            raise InvalidArgumentError("the responses store needs room for at least one response",
                                       param="responses_store_size")
        self.max_size = max_size
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._responses)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def put(self, response: ResponseObject, input_items: list[InputItem]) -> None:
        """Keep a finished response with its conversation: input_items (the previous conversation and this
        request's input) followed by its output."""
        ids = self._earlier_ids(response, input_items)
        key = response.id.removeprefix("resp_")
        for i in range(len(ids), len(input_items)):
            item = input_items[i]
            # the client's id when it gave one (a model without the field has none)
            ids.append(getattr(item, "id", None) or f"{_ID_PREFIX[item.type]}_{key}_{i}")
        output = _output_items(response)
        self._responses[response.id] = StoredResponse(response, [*input_items, *(item for _, item in output)],
                                                      len(input_items), [*ids, *(i for i, _ in output)])
        self._responses.move_to_end(response.id)
        while len(self._responses) > self.max_size:
            self._responses.popitem(last=False)

    def _earlier_ids(self, response: ResponseObject, input_items: list[InputItem]) -> list[str]:
        """The ids of the previous response's conversation when input_items starts with it (the same items:
        conversation_before handed them out), so that an item keeps its id from one response to the next."""
        previous = self._responses.get(response.previous_response_id or "")
        if previous is None or len(previous.conversation) > len(input_items) or \
                len(previous.item_ids) != len(previous.conversation):
            return []
        if all(a is b for a, b in zip(previous.conversation, input_items)):
            return list(previous.item_ids)
        return []

    def delete(self, response_id: str) -> bool:
        """Forget a response; False when it is not kept."""
        return self._responses.pop(response_id, None) is not None

    def conversation_before(self, previous_response_id: str) -> list[InputItem]:
        """The conversation a request continues; a 400 naming previous_response_id when it is not kept."""
        stored = self.get(previous_response_id)
        if stored is None:
            raise PreviousResponseNotFoundError(f"previous response {previous_response_id!r} is not found: this "
                                                f"server keeps the last {self.max_size} stored responses, in memory")
        return stored.conversation
