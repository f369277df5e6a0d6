"""Pythonic format (Llama 3.2 and 4, some others): the message is a Python list of calls with keyword
arguments, `[get_weather(city="Paris"), get_time(tz="UTC")]`, optionally in <|python_start|>...<|python_end|>.
Arguments are Python literals (and JSON's true, false and null, which some models write, as vLLM reads them),
sent as JSON; so a streamed call gets its name when `name(` is written and its arguments when its closing
parenthesis is. Leading and trailing whitespace around the list, tuples (as arrays), negative numbers,
dotted names and the <|python_start|> tags under either parser name are read too, where vLLM's pattern
turns such an output into content."""

from __future__ import annotations

import ast
import json
import re

from meshserve.serve.tool_parsers.base import ParsedToolCall, PartialToolCall, PartialToolCalls, ToolParser
from meshserve.serve.tool_parsers.json_spans import scan_memo, string_end

PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
_NAME = re.compile(r"\s*([A-Za-z_][\w.]*)\s*\(")
_PAIRS = {"(": ")", "[": "]", "{": "}"}
_JSON_NAMES = {"true": True, "false": False, "null": None}


class _JsonNames(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.Constant(_JSON_NAMES[node.id]) if node.id in _JSON_NAMES else node


def _body(text: str) -> int:
    """Where the list starts: after leading whitespace and an optional <|python_start|> (and whitespace)."""
    i = len(text) - len(text.lstrip())
    if text.startswith(PYTHON_START, i):
        i += len(PYTHON_START)
        while i < len(text) and text[i].isspace():
            i += 1
    return i


_STRUCTURE = re.compile(r"""['"()\[\]{}]""")


def _close_paren(text: str, i: int) -> int | None:
    """Index after the parenthesis closing the one at text[i - 1] (Python strings and brackets followed),
    None while it is open or when a bracket closes the wrong one. A stream's text resumes the last step's
    scan (its memo's pieces hold where it stopped, with the brackets open there)."""
    memo, key = scan_memo(text), ("paren", i)
    seen = memo.pieces.get(key) if memo is not None else None
    if seen is not None and seen[0]:  # settled: closed (the index after it) or malformed (None)
        return seen[1]
    i, stack = (seen[1], list(seen[2])) if seen is not None else (i, [")"])
    settled, end = False, None
    while (m := _STRUCTURE.search(text, i)) is not None:
        c, i = m.group(), m.start()
        if c in "'\"":
            closed = string_end(text, i)
            if closed is None:
                break  # resume at this string
            i = closed
            continue
        i += 1
        if c in _PAIRS:
            stack.append(_PAIRS[c])
        elif c != stack.pop():
            settled = True  # a bracket closing the wrong one: never a call
            break
        elif not stack:
            settled, end = True, i
            break
    else:
        i = len(text)
    if memo is not None:
        memo.pieces[key] = (True, end) if settled else (False, i, tuple(stack))
    return end


def _arguments(call_text: str) -> str | None:
    """The JSON arguments of one `name(k=v, ...)` call, or None when it is not one (positional arguments,
    values that are not literals or not JSON-able)."""
    try:
        node = ast.parse(call_text.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
            return None
        names = _JsonNames()
        return json.dumps({k.arg: ast.literal_eval(names.visit(k.value)) for k in node.keywords}, ensure_ascii=False,
                          allow_nan=False)  # inf (1e999) is not JSON: not a call
    except (SyntaxError, ValueError, TypeError, RecursionError):
        return None


def _calls(body: str, start: int) -> tuple[list[ParsedToolCall] | None, list[PartialToolCall]]:
    """(the calls of a finished list from body[start], None if it is not one; the calls as far as they go)."""
    finished: list[ParsedToolCall] | None = []
    partial: list[PartialToolCall] = []
    if not body.startswith("[", start):
        return None, partial
    i = start + 1
    while True:
        while i < len(body) and body[i] in ", \t\r\n":
            i += 1
        if i >= len(body):
            return None, partial
        if body[i] == "]":  # the list may be followed by <|python_end|> alone (a string in it may hold one)
            rest = body[i + 1:].strip()
            return (finished if partial and rest in ("", PYTHON_END) else None), partial
        head = _NAME.match(body, i)
        if head is None:
            return None, partial
        partial.append(PartialToolCall(head.group(1), ""))
        end = _close_paren(body, head.end())
        args = _arguments(body[i:end]) if end is not None else None
        if args is None:
            return None, partial
        partial[-1].arguments = args
        assert finished is not None
        finished.append(ParsedToolCall(head.group(1), args))
        i = end  # type: ignore[assignment]


class PythonicToolParser(ToolParser):
    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        calls = _calls(text, _body(text))[0]
        return (None, calls) if calls else (text, [])

    def extract_partial(self, text: str) -> PartialToolCalls:
        stripped = text.lstrip()
        if stripped and not stripped.startswith(("[", PYTHON_START)) and not PYTHON_START.startswith(stripped):
            return PartialToolCalls(len(text))
        return PartialToolCalls(0, _calls(text, _body(text))[1])
