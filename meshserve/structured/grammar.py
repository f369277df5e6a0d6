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
            xgr.Grammar.from_ebnf(spec)
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
    return compiler.compile_grammar(spec)
