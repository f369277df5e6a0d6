"""Llama 3.1+ JSON format: the whole message is `{"name": ..., "parameters": {...}}` (optionally after
<|python_tag|>, several calls separated by "; ", or by ", " or whitespace alone, which vLLM takes too).

Unlike vLLM's non-streamed parse, which takes call objects anywhere in the text and drops the text around
them, a message with text before or after its calls is content (as vLLM's own stream sends it)."""

from __future__ import annotations

from meshserve.serve.tool_parsers.base import ParsedToolCall, PartialToolCalls, ToolParser, scan_json_calls

PYTHON_TAG = "<|python_tag|>"
SEPARATORS = ";,"


def _body_start(text: str) -> int | None:
    """Where the calls start, or None when the message is not (or not yet surely) calls."""
    i = len(text) - len(text.lstrip())
    if text.startswith(PYTHON_TAG, i):
        i += len(PYTHON_TAG)
        i += len(text[i:]) - len(text[i:].lstrip())
    return i if text.startswith("{", i) else None


class Llama3JsonToolParser(ToolParser):
    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        i = _body_start(text)
        calls = scan_json_calls(text, i, SEPARATORS)[0] if i is not None else None
        return (None, calls) if calls else (text, [])

    def extract_partial(self, text: str) -> PartialToolCalls:
        body = text.lstrip()
        if not body or body.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(body):
            i = _body_start(text)  # may still become a call: no content yet
            return PartialToolCalls(0, scan_json_calls(text, i, SEPARATORS)[1] if i is not None else [])
        return PartialToolCalls(len(text))
