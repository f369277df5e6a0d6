"""Qwen3-Coder XML format: content, then per call
`<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n...</function>\n</tool_call>`.
Values are raw text, typed by the tool's parameter schema (a string stays text; numbers, booleans,
objects and arrays are read as JSON, then as Python literals). A parameter the schema does not declare
(or any parameter of a function not among the tools) is typed the same way, as JSON then a Python literal,
else text, where vLLM keeps it text. The JSON arguments grow one parameter at a time: a stream sends `{`,
then each parameter once its closing tag is written, then `}`. A call cut short (or malformed) after its
name keeps the parameters completed so far, closed into an object, as vLLM's does; the content before the
calls is kept as written (vLLM strips it when calls follow, which its own stream cannot do)."""

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
from meshserve.serve.tool_parsers.json_spans import scan_memo

CALL_START, FUNCTION, FUNCTION_END, PARAMETER = "<tool_call>", "<function=", "</function>", "<parameter="
PARAMETER_END = "</parameter>"
_FUNCTION = re.compile(r"<function=([^<>\n]*[^<>\s][^<>\n]*)>")  # a name with a character other than space
# a parameter ends at its closing tag, or where the next one begins when the model left it out (as in vLLM)
_PARAMETER = re.compile(r"<parameter=([^<>\n]+)>\n?(.*?)\n?(?:</parameter>|(?=<parameter=))", re.DOTALL)


def _typed(value: str, schema: dict[str, Any] | None) -> Any:
    kind = (schema or {}).get("type")
    if kind == "string" or (isinstance(kind, list) and "string" in kind and value.lower() != "null"):
        return value
    for read in (json.loads, ast.literal_eval):
        try:
            typed = read(value)
            json.dumps(typed, allow_nan=False)  # JSON-able, and no NaN or infinity (1e999), which JSON lacks
            return typed
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            continue
    return value  # not a literal: the model's text, as a string


def _closed(arguments: str) -> bool:
    try:
        json.loads(arguments)
        return True
    except json.JSONDecodeError:
        return False


class Qwen3CoderToolParser(ToolParser):
    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        self.schemas = {t["function"]["name"]: (t["function"].get("parameters") or {}).get("properties", {})
                        for t in tools or [] if t.get("function")}

    def _member(self, function: str, key: str, raw: str) -> str:
        value = _typed(raw, self.schemas.get(function, {}).get(key))
        return f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}"

    def _parameter(self, text: str, p: int, e: int, function: str) -> tuple[str, int] | None:
        """(the JSON member, the index after it) of the parameter at p, before </function> at e (-1: not
        written yet); None while it is open or when it is malformed."""
        if e < 0 and text.find(PARAMETER_END, p) < 0 and text.find(PARAMETER, p + len(PARAMETER)) < 0:
            return None  # no end yet: the regular expression would read the whole open value to say so
        param = _PARAMETER.match(text, p, e if e >= 0 else len(text))
        if param is None:
            return None
        return self._member(function, param.group(1).strip(), param.group(2)), param.end()

    def _calls(self, text: str, start: int) -> tuple[list[ParsedToolCall] | None, list[PartialToolCall]]:
        memo = scan_memo(text)
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
            while True:  # the parameters up to </function>; other text between them is skipped, as by vLLM
                p, e = text.find(PARAMETER, i), text.find(FUNCTION_END, i)
                if p < 0 or 0 <= e < p:
                    if e < 0:
                        return None, partial  # cut short
                    break
                if (piece := memo.pieces.get(p) if memo is not None else None) is None:
                    piece = self._parameter(text, p, e, name)
                    if piece is None:
                        if e < 0:
                            return None, partial  # still being written
                        i = p + len(PARAMETER)  # left open before </function>: dropped, as by vLLM
                        continue
                    if memo is not None:  # the earliest end tag stays the earliest as the text grows
                        memo.pieces[p] = piece
                members.append(piece[0])
                partial[-1].arguments = "{" + ", ".join(members)
                i = piece[1]
            partial[-1].arguments += "}"
            assert finished is not None
            finished.append(ParsedToolCall(name, partial[-1].arguments))
            i = e + len(FUNCTION_END)

    @staticmethod
    def _start(text: str) -> int:
        found = [i for i in (text.find(CALL_START), text.find(FUNCTION)) if i >= 0]
        return min(found) if found else -1

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        start = self._start(text)
        if start < 0:
            return text, []
        calls, begun = self._calls(text, start)
        if calls is None and begun:  # cut short or malformed after a name: what a stream has sent, closed
            calls = [ParsedToolCall(c.name, c.arguments if _closed(c.arguments) else c.arguments + "}")
                     for c in begun]
        if not calls:
            return text, []
        return (text[:start] if text[:start].strip() else None), calls

    def extract_partial(self, text: str) -> PartialToolCalls:
        start = self._start(text)
        if start < 0:
            return PartialToolCalls(len(text) - max(held_back(text, CALL_START), held_back(text, FUNCTION)))
        return PartialToolCalls(start, self._calls(text, start)[1])
