"""Qwen3-Coder XML format: content, then per call
`<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n...</function>\n</tool_call>`.
Values are raw text, typed by the tool's parameter schema (a string stays text; numbers, booleans,
objects and arrays are read as JSON, then as Python literals). The JSON arguments grow one parameter at a
time: a stream sends `{`, then each parameter once its closing tag is written, then `}`."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from meshserve.serve.tool_parsers.base import (
    ParsedToolCall,
    PartialToolCall,
    PartialToolCalls,
    ToolParser,
    held_back,
)

CALL_START, FUNCTION = "<tool_call>", "<function="
_FUNCTION = re.compile(r"<function=([^>\n]+)>")
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)
_FUNCTION_END = re.compile(r"\s*</function>")


def _typed(value: str, schema: dict[str, Any] | None) -> Any:
    kind = (schema or {}).get("type")
    if kind == "string" or (isinstance(kind, list) and "string" in kind and value.lower() != "null"):
        return value
    for read in (json.loads, ast.literal_eval):
        try:
            return read(value)
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            continue
    return value  # not a literal: the model's text, as a string


class Qwen3CoderToolParser(ToolParser):
    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        self.schemas = {t["function"]["name"]: (t["function"].get("parameters") or {}).get("properties", {})
                        for t in tools or [] if t.get("function")}

    def _member(self, function: str, key: str, raw: str) -> str:
        value = _typed(raw, self.schemas.get(function, {}).get(key))
        return f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}"

    def _calls(self, text: str, start: int) -> tuple[list[ParsedToolCall] | None, list[PartialToolCall]]:
        finished: list[ParsedToolCall] | None = []
        partial: list[PartialToolCall] = []
        i = start
        while True:
            i = text.find(FUNCTION, i)
            if i < 0:
                return (finished if partial else None), partial
            head = _FUNCTION.match(text, i)
            if head is None:
                return None, partial
            name, members, i = head.group(1).strip(), [], head.end()
            partial.append(PartialToolCall(name, "{"))
            while (param := _PARAMETER.match(text, i)) is not None:
                members.append(self._member(name, param.group(1).strip(), param.group(2)))
                partial[-1].arguments = "{" + ", ".join(members)
                i = param.end()
            end = _FUNCTION_END.match(text, i)
            if end is None:
                return None, partial
            partial[-1].arguments += "}"
            assert finished is not None
            finished.append(ParsedToolCall(name, partial[-1].arguments))
            i = end.end()

    @staticmethod
    def _start(text: str) -> int:
        found = [i for i in (text.find(CALL_START), text.find(FUNCTION)) if i >= 0]
        return min(found) if found else -1

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        start = self._start(text)
        calls = self._calls(text, start)[0] if start >= 0 else None
        if not calls:
            return text, []
        return (text[:start] if text[:start].strip() else None), calls

    def extract_partial(self, text: str) -> PartialToolCalls:
        start = self._start(text)
        if start < 0:
            return PartialToolCalls(len(text) - max(held_back(text, CALL_START), held_back(text, FUNCTION)))
        return PartialToolCalls(start, self._calls(text, start)[1])
