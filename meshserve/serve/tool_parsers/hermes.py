"""Hermes format (Qwen 2.5/3, Hermes 2/3, many others): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`."""

from __future__ import annotations

import json
import re

from meshserve.serve.tool_parsers.base import ParsedToolCall, ToolParser, call_from_json, held_back

START, END = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class HermesToolParser(ToolParser):
    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        start = text.find(START)
        if start < 0:
            return text, []
        calls = []
        for body in _CALL.findall(text[start:]):
            try:
                call = call_from_json(json.loads(body))
            except json.JSONDecodeError:
                call = None
            if call is None:  # a malformed call: the whole output stays text, as vLLM does
                return text, []
            calls.append(call)
        content = text[:start]
        return (content if content.strip() else None), calls

    def content_prefix_len(self, text: str) -> int:
        start = text.find(START)
        return start if start >= 0 else len(text) - held_back(text, START)
