"""Response affinity: requests that name a stored response go to the replica that keeps it.

A replica keeps its last Responses-API responses in its own memory (`meshserve serve --responses-store-size
N`), so `previous_response_id` on POST /v1/responses, and GET / DELETE /v1/responses/{id}, .../input_items
and .../cancel only work on the replica that answered that response. The router learns each response's replica
from the answer as it passes through (a whole body's `id`, or a stream's first event, response.created) and
sends the requests that name it there. An id the router never saw (it restarted, another worker of --workers N
saw it, or the map forgot it) is looked for instead: the healthy replicas are asked in turn, each once, until
one answers other than "not found" (proxy.py).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Any

RESPONSES_PATH = "/v1/responses"
# GET/DELETE /v1/responses/{id}, GET .../input_items, POST .../cancel (an id never holds a slash)
_NAMED_PATH = re.compile(r"/v1/responses/([^/]+)(?:/input_items|/cancel)?")
# a replica without the response: a 404 (GET, DELETE, ...), or OpenAI's 400 for previous_response_id
_PREVIOUS_NOT_FOUND = "previous_response_not_found"


class ResponseOwners:
    """Response id -> the URL of the replica that answered it, the least recently used forgotten first.

    Bounded because every response through the router adds one entry (~200 bytes: 100,000 of them are ~20 MB
    per router process). Each replica keeps only its last N (--responses-store-size), so an id the map has
    forgotten is mostly gone from its replica too; one that is not is still found by the search.
    """

    def __init__(self, max_size: int):
        self.max_size = max_size
        self._owners: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def learn(self, response_id: str | None, url: str) -> None:
        if not response_id:
            return
        self._owners[response_id] = url
        self._owners.move_to_end(response_id)
        while len(self._owners) > self.max_size:
            self._owners.popitem(last=False)

    def owner(self, response_id: str) -> str | None:
        url = self._owners.get(response_id)
        if url is not None:
            self._owners.move_to_end(response_id)
        return url

    def answered(self, method: str, response_id: str, url: str) -> None:
        """A replica answered a request naming the response with success: it keeps it (after a DELETE: no
        more)."""
        if method == "DELETE":
            self._owners.pop(response_id, None)
        else:
            self.learn(response_id, url)


def named_response(method: str, path: str, body: dict[str, Any] | None) -> str | None:
    """The stored response a request needs (its path's id, or a create's previous_response_id), if any."""
    if method == "POST" and path == RESPONSES_PATH:
        previous = body.get("previous_response_id") if body else None
        return previous if isinstance(previous, str) and previous else None
    match = _NAMED_PATH.fullmatch(path)
    return match.group(1) if match else None


def creates_response(method: str, path: str) -> bool:
    return method == "POST" and path == RESPONSES_PATH


def body_response_id(content: bytes) -> str | None:
    """A whole /v1/responses answer's id."""
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    response_id = body.get("id") if isinstance(body, dict) else None
    return response_id if isinstance(response_id, str) else None


def event_response_id(event: bytes) -> str | None:
    """The response id of a /v1/responses stream's first event (response.created carries the response)."""
    for line in event.splitlines():
        if line.startswith(b"data:"):
            try:
                data = json.loads(line[5:])
            except (ValueError, UnicodeDecodeError):
                return None
            if not isinstance(data, dict) or data.get("type") != "response.created":
                return None
            response_id = data["response"].get("id") if isinstance(data.get("response"), dict) else None
            return response_id if isinstance(response_id, str) else None
    return None


def is_not_found(status: int, content: bytes) -> bool:
    """Whether a replica's answer says it does not keep the response named (so another replica may)."""
    if status == 404:
        return True
    if status != 400:
        return False
    try:
        error = json.loads(content).get("error")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(error, dict) and error.get("code") == _PREVIOUS_NOT_FOUND
