"""Llama 3.1+ JSON format: the whole message is `{"name": ..., "parameters": {...}}` (optionally after
<|python_tag|>, several calls separated by "; ")."""

from __future__ import annotations

import json

from meshserve.serve.tool_parsers.base import ParsedToolCall, ToolParser, call_from_json

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        body = text.strip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):].lstrip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, i = json.JSONDecoder(), [], 0
        while i < len(body):
            try:
                obj, i = decoder.raw_decode(body, i)
            except json.JSONDecodeError:
                return text, []
            call = call_from_json(obj)
            if call is None:
                return text, []
            calls.append(call)
            while i < len(body) and body[i] in " \t\n;":
                i += 1
        return None, calls

    def content_prefix_len(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(body):
            return 0  # may still become a call: wait
        return len(text)
