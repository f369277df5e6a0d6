"""Where the members of a JSON object, complete or still being written, lie in a model's text.

Tool-call arguments are sent as the model wrote them (OpenAI's arguments are the model's text), so a
stream can send each argument character as it comes and the concatenation equals the whole response's
arguments. That needs the span of each member's value in raw text, open or closed, which JSON parsers
(json, partial-json-parser) do not report: they return values, whose re-serialisation is not a stable
prefix of anything. Validity is checked with json.loads on the finished spans.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

_WS = " \t\r\n"
_CLOSERS = {"{": "}", "[": "]"}


def _no_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def loads(text: str):
    """json.loads, strict: NaN and Infinity (which Python's json reads and writes) are not JSON."""
    return json.loads(text, parse_constant=_no_constant)


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """Index after the string starting at text[i] == '"', None while it is open."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """Index after the JSON value starting at text[i] (no leading whitespace), None while it may go on.
    Only the structure is followed (strings, brackets); json.loads judges the content."""
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c in _CLOSERS:
        depth = 0
        while i < len(text):
            c = text[i]
            if c == '"':
                end = _string_end(text, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    j = i  # a number or literal ends at a delimiter; at the end of the text it may still grow
    while j < len(text) and text[j] not in _WS + ",}]":
        j += 1
    return j if j < len(text) else None


@dataclass
class ObjectSpans:
    """An object's members so far: key -> (value start, value end or None while it is open)."""

    members: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    start: int = 0  # index of the opening brace
    end: int | None = None  # index after the closing brace, None while open
    broken: bool = False  # the text cannot continue into a JSON object (or repeats a key: see scan_object)

    def value(self, text: str, key: str):
        """The member's parsed value once it is complete (else None)."""
        start, end = self.members.get(key, (0, None))
        if end is None:
            return None
        try:
            return loads(text[start:end])
        except json.JSONDecodeError:
            return None


def scan_object(text: str, i: int) -> ObjectSpans:
    """The members of the object starting at text[i] == '{'. A key written twice breaks the object there:
    json.loads would keep the later value, but the earlier one (a call's name, its arguments) may have been
    streamed already, so the members stay the first ones and the object counts as malformed."""
    spans = ObjectSpans(start=i)
    i = skip_ws(text, i + 1)
    if i < len(text) and text[i] == "}":
        spans.end = i + 1
        return spans
    while i < len(text):
        if text[i] != '"':
            spans.broken = True
            return spans
        key_end = _string_end(text, i)
        if key_end is None:
            return spans
        try:
            key = json.loads(text[i:key_end])
        except json.JSONDecodeError:
            spans.broken = True
            return spans
        if key in spans.members:
            spans.broken = True
            return spans
        i = skip_ws(text, key_end)
        if i >= len(text):
            return spans
        if text[i] != ":":
            spans.broken = True
            return spans
        i = skip_ws(text, i + 1)
        if i >= len(text):
            return spans
        end = value_end(text, i)
        spans.members[key] = (i, end)
        if end is None:
            return spans
        i = skip_ws(text, end)
        if i >= len(text):
            return spans
        if text[i] == "}":
            spans.end = i + 1
            return spans
        if text[i] != ",":
            spans.broken = True
            return spans
        i = skip_ws(text, i + 1)
    return spans
