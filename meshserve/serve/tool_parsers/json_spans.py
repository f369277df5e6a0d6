"""Where the members of a JSON object, complete or still being written, lie in a model's text.

Tool-call arguments are sent as the model wrote them (OpenAI's arguments are the model's text), so a
stream can send each argument character as it comes and the concatenation equals the whole response's
arguments. That needs the span of each member's value in raw text, open or closed, which JSON parsers
(json, partial-json-parser) do not report: they return values, whose re-serialisation is not a stable
prefix of anything. Validity is checked with json.loads on the finished spans.
"""

from __future__ import annotations

import json
import re
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


# The scans below run on every streamed step over the whole output so far (a tool call writing a file is
# thousands of tokens), so they jump by str.find and regular expressions, not by characters in Python, and a
# stream's text (GrowingText) carries where the last step's scans stopped, so each step reads only what is new.
_STRUCTURE = re.compile(r'["{}\[\]]')
_ATOM = re.compile(r"[^ \t\r\n,}\]]*")


class ScanMemo:
    """Where the scans of a growing text stopped: by a string's or container's start, (True, its end) once
    closed, else (False, where to go on[, the bracket depth there]). Valid for any text extending the one
    it was filled on."""

    def __init__(self):
        self.strings: dict[int, tuple] = {}
        self.containers: dict[int, tuple] = {}
        self.pieces: dict[object, tuple] = {}  # a parser's own, by a key of its own (qwen3_coder's parameters)


class GrowingText(str):
    """A stream's output so far with the ScanMemo of the earlier outputs it extends (slices are plain str:
    the memo never reaches text it was not filled on)."""

    memo: ScanMemo

    @classmethod
    def extending(cls, text: str, before: GrowingText | None) -> GrowingText:
        """text, reusing before's memo when text extends it (else a fresh one)."""
        grown = cls(text)
        grown.memo = before.memo if before is not None and text.startswith(before) else ScanMemo()
        return grown


def scan_memo(text: str) -> ScanMemo | None:
    """text's memo when it is a stream's GrowingText."""
    return text.memo if type(text) is GrowingText else None


def string_end(text: str, i: int) -> int | None:
    """Index after the string starting at text[i] (its quote, '"', or "'" for Python's), None while it is
    open: its first quote after an even run of backslashes (text[i] stops the run)."""
    memo = scan_memo(text)
    j = i + 1
    if memo is not None and (seen := memo.strings.get(i)) is not None:
        if seen[0]:
            return seen[1]
        j = seen[1]
    quote = text[i]
    while (j := text.find(quote, j)) >= 0:
        k = j
        while text[k - 1] == "\\":
            k -= 1
        if (j - k) % 2 == 0:
            if memo is not None:
                memo.strings[i] = (True, j + 1)
            return j + 1
        j += 1
    if memo is not None:
        memo.strings[i] = (False, len(text))  # a quote from here on is judged by the backslashes before it
    return None


def value_end(text: str, i: int) -> int | None:
    """Index after the JSON value starting at text[i] (no leading whitespace), None while it may go on.
    Only the structure is followed (strings, brackets); json.loads judges the content."""
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        return string_end(text, i)
    if c in _CLOSERS:
        return _container_end(text, i)
    j = _ATOM.match(text, i).end()  # a number or literal ends at a delimiter; at the end of the text it may grow
    return j if j < len(text) else None


def _container_end(text: str, start: int) -> int | None:
    """Index after the object or array starting at text[start], None while it is open; a stream's text goes
    on from where the last step's scan stopped (outside any string, at that bracket depth)."""
    memo = scan_memo(text)
    i, depth = start, 0
    if memo is not None and (seen := memo.containers.get(start)) is not None:
        if seen[0]:
            return seen[1]
        i, depth = seen[1], seen[2]
    end = None
    while (m := _STRUCTURE.search(text, i)) is not None:
        c, i = m.group(), m.start()
        if c == '"':
            closed = string_end(text, i)
            if closed is None:
                break  # resume at this string
            i = closed
            continue
        depth += 1 if c in "{[" else -1
        i += 1
        if depth == 0:
            end = i
            break
    else:
        i = len(text)
    if memo is not None:
        memo.containers[start] = (True, end) if end is not None else (False, i, depth)
    return end


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
        key_end = string_end(text, i)
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
