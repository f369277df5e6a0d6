"""What every tool-call parser offers: a whole-text parse and, for streaming, how much text is surely content."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # JSON text


def call_from_json(obj: Any) -> ParsedToolCall | None:
    """{"name": ..., "arguments" | "parameters": {...}} -> a call; anything else -> None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models send the arguments already as JSON text
        try:
            json.loads(args)
        except json.JSONDecodeError:
            return None
        return ParsedToolCall(obj["name"], args)
    return ParsedToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of text that could begin the marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolParser:
    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(content, tool calls) of a whole output; no calls: (text, [])."""
        raise NotImplementedError

    def content_prefix_len(self, text: str) -> int:
        """How many leading characters of a partial output are content whatever comes next (streamed as
        they come; the rest waits for the end, when extract decides)."""
        raise NotImplementedError
