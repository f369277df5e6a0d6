"""SSE events of streamed chunks without pydantic: the per-token path's JSON, assembled from bytes.

A stream's chunks differ only in their choice (index, new text, finish and stop reasons), so the head
(`id`, `object`, `created`, `model`) is encoded once per stream and each event costs one msgspec string
encode. The bytes are exactly what the pydantic models (`CompletionChunk`, `ChatCompletionChunk`) would give
for the same chunk (same keys in the same order, nulls included, as vLLM's; chat deltas omit their unset fields,
as OpenAI's and vLLM's do); chunks with logprobs or tool calls still go through the models.
"""

from __future__ import annotations

import time

import msgspec

_encode = msgspec.json.encode
# Characters JSON may carry raw that line readers (str.splitlines, so httpx's aiter_lines) treat as line
# breaks: escaped, so an event never splits in a client that reads the stream by lines (as streaming.py does).
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def json_string(text: str) -> bytes:
    raw = _encode(text)
    if b"\xc2\x85" in raw or b"\xe2\x80\xa8" in raw or b"\xe2\x80\xa9" in raw:
        for char, escaped in _LINE_BREAKS:
            raw = raw.replace(char, escaped)
    return raw


class ChunkEncoder:
    """The SSE events of one stream's text chunks (completions or chat)."""

    __slots__ = ("_head", "_tail")

    def __init__(self, request_id: str, model: str, object_name: str, created: int | None = None):
        created = int(time.time()) if created is None else created
        self._head = (b'data: {"id":' + json_string(request_id) + b',"object":' + _encode(object_name)
                      + b',"created":' + str(created).encode() + b',"model":' + json_string(model)
                      + b',"choices":[{"index":')
        self._tail = b'}]}\n\n'

    def completion(self, index: int, text: str, finish_reason: str | None, stop_reason: int | str | None) -> bytes:
        """A /v1/completions chunk of one choice without logprobs or token ids."""
        return b"".join((self._head, str(index).encode(), b',"text":', json_string(text),
                         b',"logprobs":null,"finish_reason":', _encode(finish_reason), b',"stop_reason":',
                         _reason(stop_reason), b',"prompt_token_ids":null,"token_ids":null', self._tail))

    def chat(self, index: int, content: str | None, finish_reason: str | None,
             stop_reason: int | str | None, token_ids: list[int] | None = None) -> bytes:
        """A /v1/chat/completions chunk of one choice whose delta holds content only (or nothing); token_ids:
        the delta's ids (return_token_ids), else None (null, as vLLM sends it)."""
        delta = b"{}" if content is None else b'{"content":' + json_string(content) + b"}"
        # vLLM's: stop_reason in the finishing chunk only
        stop = b"" if finish_reason is None else b',"stop_reason":' + _reason(stop_reason)
        return b"".join((self._head, str(index).encode(), b',"delta":', delta,
                         b',"logprobs":null,"finish_reason":', _encode(finish_reason), stop,
                         b',"token_ids":', _encode(token_ids), self._tail))


def _reason(stop_reason: int | str | None) -> bytes:
    return json_string(stop_reason) if isinstance(stop_reason, str) else _encode(stop_reason)
