"""A request's constraint as an xgrammar grammar: checked in the front end, compiled in the core.

Checking builds the grammar without a vocabulary (milliseconds), so a bad schema, regex or EBNF is a 400
naming xgrammar's complaint before the request reaches the engine; compiling against the vocabulary (the
token mask cache, the slow part) happens in the core, off its step loop (compiler.py).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from meshserve.errors import InvalidArgumentError
from meshserve.structured.params import StructuredOutputsParams

# JSON-schema keywords xgrammar would silently ignore: refused rather than answered with output that
# breaks them (vLLM refuses a similar list for its xgrammar backend)
UNSUPPORTED_SCHEMA_KEYWORDS = frozenset({
    "not", "if", "then", "else", "dependentSchemas", "dependentRequired", "uniqueItems", "contains",
    "minContains", "maxContains", "unevaluatedProperties", "unevaluatedItems", "propertyNames",
})

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes a failed check
_NATIVE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def native_message(e: BaseException) -> str:
    """xgrammar's error without the C++ source location."""
    return _NATIVE_PREFIX.sub("", str(e).strip()).strip()


# string formats xgrammar 0.2.9 enforces; with one of them (or a pattern) it ignores minLength/maxLength
XGRAMMAR_STRING_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
    "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
})


def _ignored_combination(schema: dict) -> tuple[str, str] | None:
    """(keyword, what to call it) of a keyword that xgrammar ignores in this schema's company (it only logs
    a warning), or None."""
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if "multipleOf" in schema and "number" in types:
        return "multipleOf", "'multipleOf' (of a number)"  # enforced for integers only
    lower = "minimum" in schema or "exclusiveMinimum" in schema
    upper = "maximum" in schema or "exclusiveMaximum" in schema
    if "multipleOf" in schema and lower != upper:  # an integer's: with no bound or both, but not one
        return "multipleOf", "'multipleOf' with a bound on one side only"
    with_ = ("pattern" if "pattern" in schema
             else "format" if str(schema.get("format")) in XGRAMMAR_STRING_FORMATS else None)
    for key in ("minLength", "maxLength"):
        if with_ and key in schema:
            return key, f"{key!r} with {with_!r}"
    return None


def _unsupported_message(where: tuple[str, str], at: str) -> str:
    return f"JSON schema keyword {where[1]} (at {at}) is not supported by structured outputs"


def _find_unsupported(schema: Any, path: str = "#") -> tuple[str, str] | None:
    """(path, what) of the first keyword in the schema that structured outputs would not enforce."""
    if isinstance(schema, dict):
        ignored = _ignored_combination(schema)
        if ignored:
            return f"{path}/{ignored[0]}", ignored[1]
        for key, value in schema.items():
            if key in UNSUPPORTED_SCHEMA_KEYWORDS and key not in ("properties", "$defs", "definitions"):
                return f"{path}/{key}", repr(key)
            if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
                for name, sub in value.items():  # property names are data, not keywords
                    found = _find_unsupported(sub, f"{path}/{key}/{name}")
                    if found:
                        return found
            elif key not in ("enum", "const", "default", "examples", "required"):
                found = _find_unsupported(value, f"{path}/{key}")
                if found:
                    return found
    elif isinstance(schema, list):
        for i, sub in enumerate(schema):
            found = _find_unsupported(sub, f"{path}/{i}")
            if found:
                return found
    return None


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar matching exactly one of the strings (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


_LARK_RULE = re.compile(r"\s*[?!]?([A-Za-z_][A-Za-z0-9_]*)(?:\.-?\d+)?\s*:(?!:)")
_LARK_TOKEN = re.compile(r"""\s+|"(?:[^"\\\n]|\\.)*"i?|'(?:[^'\\\n]|\\.)*'i?|\.\.|~\s*\d+(?:\s*\.\.\s*\d+)?|"""
                         r"""[A-Za-z_][A-Za-z0-9_]*|[()|*+?\[\]]|/(?:[^/\\\n]|\\.)+/[a-z]*|.""")


def grammar_is_lark(grammar: str) -> bool:
    """Whether a grammar is Lark's syntax (`rule: ...`), as vLLM guesses it: no line defines a rule with `::=`."""
    return not any("::=" in re.sub(r"(#|//).*$", "", line) for line in grammar.split("\n"))


def _lark_literal(tok: str) -> str:
    if tok.endswith("i") and tok[-2] in "'\"":
        raise ValueError(f"case-insensitive literal {tok} is not supported")
    body = tok[1:-1]
    text = body.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in body else body
    return json.dumps(text, ensure_ascii=False)


def _lark_body(body: str) -> str:
    """One rule's right side in xgrammar's EBNF: quotes as JSON strings, [x] as (x)?, "a".."z" as [a-z], x ~ n as
    x{n}; regular-expression terminals and other Lark extensions are refused (ValueError)."""
    out: list[str] = []
    brackets: list[int] = []
    for m in _LARK_TOKEN.finditer(body):
        tok = m.group()
        if tok.isspace():
            continue
        if tok[0] in "'\"":
            out.append(_lark_literal(tok))
        elif tok == "..":
            if not out or not out[-1].startswith('"'):
                raise ValueError("a range (..) needs a literal on each side")
            out.append(tok)
        elif tok.startswith("~"):
            counts = [c.strip() for c in tok[1:].split("..")]
            out.append("{" + ",".join(counts) + "}")
        elif tok == "[":
            brackets.append(len(out))
            out.append("(")
        elif tok == "]":
            if not brackets:
                raise ValueError("unbalanced ]")
            brackets.pop()
            out.append(")?")
        elif tok[0] == "/" and len(tok) > 1:
            raise ValueError(f"regular-expression terminal {tok} is not supported")
        elif tok[0].isalpha() or tok[0] == "_" or tok in "()|*+?":
            out.append(tok)
        else:
            raise ValueError(f"unexpected {tok!r}")
    if brackets:
        raise ValueError("unbalanced [")
    merged: list[str] = []
    i = 0
    while i < len(out):  # "a" .. "z" -> [a-z]
        if i + 2 < len(out) and out[i + 1] == "..":
            lo, hi = json.loads(out[i]), json.loads(out[i + 2])
            if len(lo) != 1 or len(hi) != 1:
                raise ValueError("a range (..) needs one character on each side")
            merged.append("[" + "-".join(c if c.isalnum() else "\\u%04x" % ord(c) for c in (lo, hi)) + "]")
            i += 3
        else:
            merged.append(out[i])
            i += 1
    return " ".join(merged) if merged else '""'


def lark_to_ebnf(grammar: str) -> str:
    """A Lark grammar (vLLM's guess: no `::=` anywhere) as xgrammar's EBNF, as vLLM converts one for xgrammar:
    `rule: a | b` and continuation lines starting with `|`, `?rule`/`!rule` prefixes dropped, the root being
    `start` or else the first rule. Comments (// and #) are dropped; %directives, /regex/ terminals and
    case-insensitive literals are refused (ValueError)."""
    if not grammar.strip():
        raise ValueError("the grammar is empty")
    rules: dict[str, list[str]] = {}
    current = None
    for n, raw in enumerate(grammar.split("\n"), 1):
        line = _strip_lark_comment(raw).rstrip()
        if not line.strip():
            continue
        try:
            if line.lstrip().startswith("%"):
                raise ValueError(f"directive {line.strip().split()[0]} is not supported")
            m = _LARK_RULE.match(line)
            if m:
                current = m.group(1)
                if current in rules:
                    raise ValueError(f"rule {current!r} is defined twice")
                rules[current] = [line[m.end():]]
            elif line.lstrip().startswith("|") and current is not None:
                rules[current].append(line.lstrip())
            else:
                raise ValueError("expected `name: definition` or a continuation starting with |")
        except ValueError as e:
            raise ValueError(f"line {n}: {e}") from None
    if not rules:
        raise ValueError("no rules found")
    root = "start" if "start" in rules else next(iter(rules))
    lines = [] if root == "root" else [f"root ::= {root}"]
    for name, parts in rules.items():
        lines.append(f"{name} ::= {_lark_body(' '.join(parts))}")
    return "\n".join(lines)


def _strip_lark_comment(line: str) -> str:
    """The line without its // or # comment (outside quotes)."""
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" or line.startswith("//", i):
            return line[:i]
        i += 1
    return line


def grammar_ebnf(grammar: str) -> str:
    """The request's grammar as xgrammar's EBNF (GBNF-style `root ::= ...`), Lark converted (ValueError)."""
    return lark_to_ebnf(grammar) if grammar_is_lark(grammar) else grammar


def structural_tag_json(spec: str) -> str:
    """xgrammar's structural tag ({"type": "structural_tag", "format": {...}}) of a request's: as given, or
    translated from vLLM's older {"structures": [{"begin", "schema", "end"}], "triggers": [...]} (free text
    in which each trigger starts one of the tagged JSON parts), whose xgrammar call is deprecated."""
    try:
        tag = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(tag, dict):
        raise TypeError("a structural tag must be an object")
    if "structures" not in tag:
        return spec
    structures, triggers = tag["structures"], tag.get("triggers")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError("triggers must be a non-empty list of strings")
    if not isinstance(structures, list) or not structures:
        raise ValueError("structures must be a non-empty list")
    tags = []
    for i, s in enumerate(structures):
        if not (isinstance(s, dict) and isinstance(s.get("begin"), str) and isinstance(s.get("end"), str)
                and isinstance(s.get("schema"), dict)):
            raise TypeError(f"structures[{i}] needs begin and end strings and a schema object")
        where = _find_unsupported(s["schema"])
        if where:
            raise ValueError(_unsupported_message(where, f"structures[{i}].schema{where[0][1:]}"))
        if not any(s["begin"].startswith(t) for t in triggers):
            raise ValueError(f"structures[{i}].begin {s['begin']!r} starts with none of the triggers")
        tags.append({"begin": s["begin"], "end": s["end"],
                     "content": {"type": "json_schema", "json_schema": s["schema"]}})
    return json.dumps({"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": triggers,
                                                           "tags": tags}})


def grammar_backend(param: str = "structured_outputs"):
    """The xgrammar module, or an InvalidArgumentError saying structured outputs are unavailable here (an install
    whose xgrammar does not import, e.g. without its apache-tvm-ffi: a request gets that one line, not the
    import's traceback)."""
    try:
        import xgrammar
    except ImportError as e:
        raise InvalidArgumentError(
            f"structured outputs are unavailable on this server: xgrammar does not import ({e}); "
            "install it with `pip install xgrammar`", param=param) from None
    return xgrammar


@functools.lru_cache(maxsize=256)
def _check(kind: str, spec: str, param: str) -> None:
    xgr = grammar_backend(param)
    try:
        if kind == "json":
            try:
                schema = json.loads(spec)
            except json.JSONDecodeError as e:
                raise InvalidArgumentError(f"the JSON schema is not valid JSON: {e}", param=param) from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidArgumentError("the JSON schema must be an object", param=param)
            where = _find_unsupported(schema)
            if where:
                raise InvalidArgumentError(_unsupported_message(where, where[0]), param=param)
            xgr.Grammar.from_json_schema(spec)
        elif kind == "regex":
            xgr.Grammar.from_regex(spec)
        elif kind == "choice":
            xgr.Grammar.from_ebnf(choice_ebnf(json.loads(spec)))
        elif kind == "grammar":
            if not spec.strip():
                raise InvalidArgumentError("the grammar is empty", param=param)
            xgr.Grammar.from_ebnf(grammar_ebnf(spec))
        elif kind == "structural_tag":
            xgr.Grammar.from_structural_tag(structural_tag_json(spec))
    except InvalidArgumentError:
        raise
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError or ValueError with the parser's message
        raise InvalidArgumentError(f"invalid {_NAMES[kind]}: {native_message(e)}", param=param) from None


_NAMES = {"json": "JSON schema", "regex": "regular expression", "choice": "choice", "grammar": "grammar",
          "structural_tag": "structural tag"}


def check_structured_outputs(params: StructuredOutputsParams, param: str = "structured_outputs") -> None:
    """Raise InvalidArgumentError naming what is wrong with the constraint (cached per spec)."""
    _check(*params.key, param)


def compile_structured_outputs(compiler, params: StructuredOutputsParams):
    """The xgrammar CompiledGrammar of the constraint (the compiler caches per spec)."""
    kind, spec = params.key
    if kind in ("json", "json_object"):
        # compact JSON (", " and ": " only): with any whitespace allowed small models pad with newlines
        return compiler.compile_json_schema(spec if kind == "json" else '{"type": "object"}', any_whitespace=False)
    if kind == "regex":
        return compiler.compile_regex(spec)
    if kind == "choice":
        return compiler.compile_grammar(choice_ebnf(json.loads(spec)))
    if kind == "structural_tag":
        return compiler.compile_structural_tag(structural_tag_json(spec))
    return compiler.compile_grammar(grammar_ebnf(spec))
