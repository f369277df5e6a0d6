"""What every tool-call parser offers: the calls of a whole output, and for streaming the calls of an
output still being written, as far as they are final.

Arguments are the model's own JSON text (as OpenAI returns them), so a streamed call's argument fragments,
sent as the text comes, add up to exactly the arguments of the whole response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from meshserve.serve.tool_parsers.json_spans import ObjectSpans, loads, scan_object


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # JSON text


@dataclass
class PartialToolCall:
    name: str
    arguments: str  # what is final of the arguments so far: a prefix of the finished call's arguments


@dataclass
class PartialToolCalls:
    content_end: int  # leading characters of the output that are content whatever comes next
    calls: list[PartialToolCall] = field(default_factory=list)


ARGUMENT_KEYS = ("arguments", "parameters")


def _arguments_span(spans: ObjectSpans, keys: tuple[str, ...]) -> tuple[int, int | None] | None:
    for key in keys:
        if key in spans.members:
            return spans.members[key]
    return None


def partial_json_call(text: str, spans: ObjectSpans, keys: tuple[str, ...] = ARGUMENT_KEYS) -> PartialToolCall | None:
    """The call an unfinished {"name": ..., "arguments": {...}} object shows so far: none before its name
    is complete; an object's arguments as far as written; other arguments once complete (JSON text in a
    string decoded, anything else as written), "" until then. A finished well-formed call shows its whole
    arguments (missing ones are {}), so a call cut short after it keeps them."""
    name = spans.value(text, "name")
    if not isinstance(name, str):
        return None
    span = _arguments_span(spans, keys)
    if span is not None and text[span[0]] in "{[":  # as written (a finished call's arguments are that text too)
        start, end = span
        return PartialToolCall(name, text[start:end] if end is not None else text[start:])
    done = _whole_call(text, spans, keys)
    if done is not None:
        return PartialToolCall(done.name, done.arguments)
    if span is None:
        return PartialToolCall(name, "")
    start, end = span
    if end is None:
        return PartialToolCall(name, "")
    try:
        value = loads(text[start:end])
    except json.JSONDecodeError:
        value = None
    return PartialToolCall(name, value if isinstance(value, str) else text[start:end])


def finished_json_call(text: str, spans: ObjectSpans, keys: tuple[str, ...] = ARGUMENT_KEYS) -> ParsedToolCall | None:
    """The call of a complete {"name": ..., "arguments": {...}} object; anything else (the object not valid
    JSON as a whole included) -> None. Arguments given as JSON text in a string (some models do) are decoded;
    missing arguments are {}."""
    return None if spans.broken else _whole_call(text, spans, keys)


def _whole_call(text: str, spans: ObjectSpans, keys: tuple[str, ...]) -> ParsedToolCall | None:
    """finished_json_call, whatever follows the object (a parser may mark it broken for that)."""
    if spans.end is None:
        return None
    try:
        loads(text[spans.start:spans.end])
    except json.JSONDecodeError:
        return None
    name = spans.value(text, "name")
    if not isinstance(name, str):
        return None
    span = _arguments_span(spans, keys)
    if span is None:
        return ParsedToolCall(name, "{}")
    start, end = span
    raw = text[start:end]
    try:
        value = loads(raw)
        if isinstance(value, str):
            raw, value = value, loads(value)
    except json.JSONDecodeError:
        return None
    return ParsedToolCall(name, raw) if isinstance(value, dict) else None


def scan_json_calls(text: str, i: int, separators: str, keys: tuple[str, ...] = ARGUMENT_KEYS,
                    closer: str | None = None) -> tuple[list[ParsedToolCall] | None, list[PartialToolCall]]:
    """A run of call objects from text[i], separated by any of `separators` (and whitespace), until the end
    of the text or `closer`: (the finished calls, None when the run is malformed or unfinished; the calls
    as far as they go)."""
    finished: list[ParsedToolCall] | None = []
    partial: list[PartialToolCall] = []
    while True:
        while i < len(text) and text[i] in separators + " \t\r\n":
            i += 1
        if i >= len(text):
            return (finished if (closer is None and partial) else None), partial
        if closer is not None and text[i] == closer:
            rest_ok = not text[i + 1:].strip()
            return (finished if rest_ok and partial else None), partial
        if text[i] != "{":
            return None, partial
        spans = scan_object(text, i)
        done = finished_json_call(text, spans, keys)
        call = PartialToolCall(done.name, done.arguments) if done is not None else partial_json_call(text, spans, keys)
        if call is not None:
            partial.append(call)
        if done is None:
            return None, partial
        assert finished is not None
        finished.append(done)
        i = spans.end  # type: ignore[assignment]


def held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of text that could begin the marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolParser:
    keeps_special_tokens = False  # True: its markers are special tokens, which the output must keep

    def __init__(self, tools: list[dict] | None = None):
        self.tools = tools or []  # the request's tools, as dicts

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(content, tool calls) of a whole output; no calls or a malformed one: (text, [])."""
        raise NotImplementedError

    def extract_partial(self, text: str) -> PartialToolCalls:
        """What an output being written shows so far: how much is surely content, and the calls begun
        (each from its complete name on, its arguments as far as they are final)."""
        raise NotImplementedError
