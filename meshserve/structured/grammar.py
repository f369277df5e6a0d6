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


def _find_unsupported(schema: Any, path: str = "#") -> str | None:
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in UNSUPPORTED_SCHEMA_KEYWORDS and key not in ("properties", "$defs", "definitions"):
                return f"{path}/{key}"
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


@functools.lru_cache(maxsize=256)
def _check(kind: str, spec: str, param: str) -> None:
    import xgrammar as xgr

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
                raise InvalidArgumentError(
                    f"JSON schema keyword {where.rsplit('/', 1)[-1]!r} (at {where}) is not supported by "
                    "structured outputs", param=param)
            xgr.Grammar.from_json_schema(spec)
        elif kind == "regex":
            xgr.Grammar.from_regex(spec)
        elif kind == "choice":
            xgr.Grammar.from_ebnf(choice_ebnf(json.loads(spec)))
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(spec)
    except InvalidArgumentError:
        raise
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError or ValueError with the parser's message
        raise InvalidArgumentError(f"invalid {_NAMES[kind]}: {native_message(e)}", param=param) from None


_NAMES = {"json": "JSON schema", "regex": "regular expression", "choice": "choice", "grammar": "grammar"}


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
    return compiler.compile_grammar(spec)
