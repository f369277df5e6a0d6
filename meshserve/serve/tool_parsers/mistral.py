"""Mistral format: content, then `[TOOL_CALLS]` and the calls, either as a JSON list
(`[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, tokenizers before v11) or one call per marker
(`[TOOL_CALLS]name{...}` from v11, `[TOOL_CALLS]name[ARGS]{...}` from v13). [TOOL_CALLS] is a special
token, so these requests keep special tokens in their text."""

from __future__ import annotations

import json
import re

from meshserve.serve.tool_parsers.base import (
    ParsedToolCall,
    PartialToolCall,
    PartialToolCalls,
    ToolParser,
    held_back,
    scan_json_calls,
)
from meshserve.serve.tool_parsers.json_spans import loads, skip_ws, value_end

MARKER = "[TOOL_CALLS]"
# a v11+ call head: the function name, an optional [CALL_ID]..., an optional [ARGS]
_HEAD = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[CALL_ID\][A-Za-z0-9]*\s*)?(?:\[ARGS\])?\s*")


def _named_calls(text: str, i: int) -> tuple[list[ParsedToolCall] | None, list[PartialToolCall]]:
    """`name{...}` calls, each after a marker, from text[i] (just after the first marker)."""
    finished: list[ParsedToolCall] | None = []
    partial: list[PartialToolCall] = []
    while True:
        head = _HEAD.match(text, i)
        if head is None or head.end() >= len(text):
            return None, partial  # the name (or its arguments) not yet written, or not a call
        if text[head.end()] != "{":
            return None, partial
        name, start = head.group(1), head.end()
        end = value_end(text, start)
        partial.append(PartialToolCall(name, text[start:end] if end is not None else text[start:]))
        if end is None:
            return None, partial
        try:
            if not isinstance(loads(text[start:end]), dict):
                return None, partial
        except json.JSONDecodeError:
            return None, partial
        assert finished is not None
        finished.append(ParsedToolCall(name, text[start:end]))
        i = skip_ws(text, end)
        if i >= len(text):
            return finished, partial
        if not text.startswith(MARKER, i):
            return None, partial
        i += len(MARKER)


def _calls(text: str, start: int) -> tuple[list[ParsedToolCall] | None, list[PartialToolCall]]:
    i = skip_ws(text, start + len(MARKER))
    if i >= len(text):
        return None, []
    if text[i] == "[":
        return scan_json_calls(text, i + 1, ",", closer="]")
    return _named_calls(text, i)


class MistralToolParser(ToolParser):
    keeps_special_tokens = True

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        start = text.find(MARKER)
        calls = _calls(text, start)[0] if start >= 0 else None
        if not calls:
            return text, []
        return (text[:start] if text[:start].strip() else None), calls

    def extract_partial(self, text: str) -> PartialToolCalls:
        start = text.find(MARKER)
        if start < 0:
            return PartialToolCalls(len(text) - held_back(text, MARKER))
        return PartialToolCalls(start, _calls(text, start)[1])
