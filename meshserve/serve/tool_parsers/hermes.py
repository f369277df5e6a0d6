"""Hermes format (Qwen 2.5/3, Hermes 2/3, many others): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
one block per call; text before the first block is content."""

from __future__ import annotations

from meshserve.serve.tool_parsers.base import (
    ParsedToolCall,
    PartialToolCalls,
    ToolParser,
    finished_json_call,
    held_back,
    partial_json_call,
)
from meshserve.serve.tool_parsers.json_spans import scan_object, skip_ws

START, END = "<tool_call>", "</tool_call>"


def _blocks(text: str, start: int):
    """(spans, index after the block) of each <tool_call> block from `start`; spans None when malformed."""
    i = start
    while True:
        i = text.find(START, i)
        if i < 0:
            return
        j = skip_ws(text, i + len(START))
        if j >= len(text):
            return
        if text[j] != "{":
            yield None, j
            return
        spans = scan_object(text, j)
        if spans.end is None:
            yield spans, len(text)
            return
        k = skip_ws(text, spans.end)
        if text.startswith(END, k):
            k += len(END)
        elif text[k:].strip() and not END.startswith(text[k:].strip()):
            spans.broken = True  # something other than the end tag after the call
        yield spans, k
        i = k


class HermesToolParser(ToolParser):
    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        start = text.find(START)
        if start < 0:
            return text, []
        calls = []
        for spans, _ in _blocks(text, start):
            call = finished_json_call(text, spans) if spans is not None else None
            if call is None:  # a malformed or unfinished call: the whole output stays text, as vLLM does
                return text, []
            calls.append(call)
        if not calls:
            return text, []
        content = text[:start]
        return (content if content.strip() else None), calls

    def extract_partial(self, text: str) -> PartialToolCalls:
        start = text.find(START)
        if start < 0:
            return PartialToolCalls(len(text) - held_back(text, START))
        found = PartialToolCalls(start)
        for spans, _ in _blocks(text, start):
            call = partial_json_call(text, spans) if spans is not None else None
            if call is None:
                break
            # a block that turns out malformed after its name still counts as begun (its name and arguments
            # were streamed while it looked right), as in the other parsers; ToolPlan.extract keeps it whole
            found.calls.append(call)
            if spans.broken:
                break
        return found
