"""A request's output constraint from its HTTP fields: OpenAI's response_format, vLLM's structured_outputs
object and vLLM's older guided_json / guided_regex / guided_choice / guided_grammar. At most one may be set;
each is checked here so that a bad schema is a 400 naming the field it came in."""

from __future__ import annotations

import asyncio
import importlib
import sys

from meshserve.errors import InvalidArgumentError
from meshserve.serve.protocol import SamplingRequest
from meshserve.structured.grammar import check_structured_outputs
from meshserve.structured.params import StructuredOutputsParams


def _from_response_format(req: SamplingRequest) -> StructuredOutputsParams | None:
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if rf.type == "structural_tag":  # vLLM passes the whole object on to xgrammar
        return StructuredOutputsParams(structural_tag=rf.model_dump(exclude_none=True, exclude={"json_schema"}))
    spec = rf.json_schema
    if not isinstance(spec, dict):
        raise InvalidArgumentError('response_format of type "json_schema" needs a json_schema object',
                                   param="response_format.json_schema")
    if spec.get("schema") is None:  # OpenAI: a missing schema means any JSON object (vLLM 0.26: a 400)
        return StructuredOutputsParams(json={"type": "object"})
    schema = spec["schema"]
    if not isinstance(schema, dict):
        raise InvalidArgumentError("response_format.json_schema.schema must be an object",
                                   param="response_format.json_schema.schema")
    return StructuredOutputsParams(json=schema)  # {} is any JSON value, as in vLLM (xgrammar's reading)


def _params(field: str, **kwargs) -> StructuredOutputsParams:
    """StructuredOutputsParams of one request field; its errors name that field."""
    try:
        return StructuredOutputsParams(**kwargs)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(str(e), param=field) from None


def structured_outputs_of(req: SamplingRequest) -> StructuredOutputsParams | None:
    """The request's constraint, checked (400 naming the field), or None for free text."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = _from_response_format(req)
    if rf is not None:
        found.append(("response_format", rf))
    if req.structured_outputs is not None:
        so = req.structured_outputs
        found.append(("structured_outputs", _params("structured_outputs", json=so.json_, regex=so.regex,
                                                    choice=so.choice, grammar=so.grammar, json_object=so.json_object,
                                                    structural_tag=so.structural_tag)))
    for name, kwargs in (("guided_json", {"json": req.guided_json}), ("guided_regex", {"regex": req.guided_regex}),
                         ("guided_choice", {"choice": req.guided_choice}),
                         ("guided_grammar", {"grammar": req.guided_grammar})):
        if next(iter(kwargs.values())) is not None:
            found.append((name, _params(name, **kwargs)))
    if not found:
        return None
    if len(found) > 1:
        raise InvalidArgumentError(f"only one output constraint may be given, got {[n for n, _ in found]}",
                                   param=found[1][0])
    name, params = found[0]
    check_structured_outputs(params, param=name)
    return params


_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def may_need_grammar(req: SamplingRequest) -> bool:
    """Whether checking the request may parse a grammar (xgrammar): an output constraint in any of its fields,
    or tools (a "required" or named tool_choice constrains the answer)."""
    rf = req.response_format
    return ((rf is not None and rf.type != "text") or req.structured_outputs is not None
            or any(getattr(req, name) is not None for name in _GUIDED) or bool(getattr(req, "tools", None)))


async def import_grammar_backend(req: SamplingRequest) -> None:
    """xgrammar's first import in this process (~1.5 s: it brings torch and transformers) on a worker thread,
    before a request's synchronous check needs it. Inline it stopped every stream of the API process for as
    long (CPU machine: the event loop's longest gap 1.43-1.53 s inline, 0.16-0.17 s from a thread, whose
    import still holds the GIL while it loads the native libraries)."""
    if "xgrammar" in sys.modules or not may_need_grammar(req):
        return
    try:
        await asyncio.to_thread(importlib.import_module, "xgrammar")
    except ImportError:
        pass  # the check itself then says what is missing
