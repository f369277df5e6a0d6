"""GET /v1/responses/{id}/input_items: a kept response's input (the conversation before it, without its
instructions, then its own input) as OpenAI lists it: items with ids and statuses, newest first unless
order=asc, a page of `limit` after the item `after`. The ids are those the store gave the items once (the
client's own where it sent one, as OpenAI keeps them: responses_store.py), so they stay the same from one listing
to the next (pagination by `after` needs that)."""

from __future__ import annotations

from typing import Any, Literal

from meshserve.errors import InvalidArgumentError
from meshserve.serve.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    InputItemList,
    InputMessage,
)
from meshserve.serve.responses_store import StoredResponse


def _item(item: InputItem, item_id: str) -> dict[str, Any]:
    """One item in the shape of the SDK's ResponseItem (assistant text as output_text, the rest as input_text)."""
    if isinstance(item, InputMessage):
        kind = "output_text" if item.role == "assistant" else "input_text"
        parts = [{"type": kind, "text": item.text()}] if isinstance(item.content, str) else \
            [{"type": kind, "text": p.text} for p in item.content]
        if kind == "output_text":
            parts = [{**p, "annotations": []} for p in parts]
        return {"type": "message", "id": item_id, "role": item.role, "status": "completed", "content": parts}
    if isinstance(item, FunctionCallItem):
        return {"type": "function_call", "id": item_id, "call_id": item.call_id, "name": item.name,
                "arguments": item.arguments, "status": "completed"}
    if isinstance(item, FunctionCallOutputItem):
        return {"type": "function_call_output", "id": item_id, "call_id": item.call_id, "output": item.text(),
                "status": "completed"}
    return {**item.model_dump(exclude_none=True), "id": item_id}  # a reasoning item, as it was sent


def input_item_list(stored: StoredResponse, after: str | None, limit: int,
                    order: Literal["asc", "desc"]) -> InputItemList:
    items = [_item(it, item_id) for it, item_id in zip(stored.conversation[:stored.num_input_items],
                                                       stored.item_ids)]
    if order == "desc":
        items.reverse()
    if after is not None:
        at = next((i for i, it in enumerate(items) if it["id"] == after), None)
        if at is None:
            raise InvalidArgumentError(f"after: no input item {after!r} in response {stored.response.id!r}",
                                       param="after")
        items = items[at + 1:]
    page = items[:limit]
    return InputItemList(data=page, first_id=page[0]["id"] if page else None,
                         last_id=page[-1]["id"] if page else None, has_more=len(items) > limit)
