"""Tool calling for /v1/chat/completions: what tool_choice asks of the engine and how the answer is read.

- "none" (or no tools): plain text; the template still sees the tools, as in vLLM.
- "auto": free text, read by the server's --tool-call-parser (needs --enable-auto-tool-choice).
- "required": the output is constrained to a JSON array of {"name", "parameters"} (one of the tools each).
- a named function: the output is constrained to that function's parameters, which become its arguments.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from meshserve.errors import InvalidArgumentError
from meshserve.serve.config import ServeConfig
from meshserve.serve.protocol import ChatCompletionRequest, ChatMessage, FunctionCall, ToolCall
from meshserve.serve.tool_parsers import (
    ParsedToolCall,
    PartialToolCall,
    PartialToolCalls,
    ToolParser,
    get_tool_parser,
)
from meshserve.serve.tool_parsers.base import scan_json_calls
from meshserve.serve.tool_parsers.json_spans import skip_ws
from meshserve.structured.grammar import check_structured_outputs
from meshserve.structured.params import StructuredOutputsParams


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parameters(tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


class _NamedToolParser(ToolParser):
    """tool_choice names a function: the whole (constrained) output is its arguments."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        return None, [ParsedToolCall(self.name, text)]

    def extract_partial(self, text: str) -> PartialToolCalls:
        return PartialToolCalls(0, [PartialToolCall(self.name, text)])


class _RequiredToolParser(ToolParser):
    """tool_choice "required": the (constrained) output is a JSON array of {"name", "parameters"}."""

    def _calls(self, text: str):
        i = skip_ws(text, 0)
        if not text.startswith("[", i):
            return None, []
        return scan_json_calls(text, i + 1, ",", keys=("parameters",), closer="]")

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        calls = self._calls(text)[0]
        return (None, calls) if calls else (text, [])  # cut short: ToolPlan.extract reads the calls begun

    def extract_partial(self, text: str) -> PartialToolCalls:
        return PartialToolCalls(0, self._calls(text)[1])


@dataclass
class ToolPlan:
    """How one request's tools are handled: its mode, the tools for the template, its constraint, and
    the parser that reads the output (whole, or as far as it is written while streaming)."""

    mode: str = "none"  # "none" | "auto" | "required" | "named"
    tools: list[dict[str, Any]] = field(default_factory=list)
    constraint: StructuredOutputsParams | None = None
    parser: ToolParser | None = None
    parallel: bool = True  # false: at most one call (OpenAI's parallel_tool_calls)

    @property
    def finish_reason_of_calls(self) -> str:
        return "stop" if self.mode == "named" else "tool_calls"  # OpenAI's choice for a forced function

    @property
    def keeps_special_tokens(self) -> bool:
        return self.parser is not None and self.parser.keeps_special_tokens

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a choice's whole output text."""
        if self.parser is None:
            return text, []
        content, calls = self.parser.extract(text)
        if not calls:
            # no call in the end, though one was begun: cut short (max_tokens, a stop string) or followed by a
            # malformed one. A stream has sent the begun calls already and cannot take them back, so the whole
            # answer is the same: those calls (arguments as far as written) after the content before them
            found = self.parser.extract_partial(text)
            if found.calls:
                head = text[:found.content_end]
                content = head if head.strip() else None
                calls = [ParsedToolCall(c.name, c.arguments) for c in found.calls]
        if not self.parallel:
            calls = calls[:1]
        return content, [ToolCall(id=new_tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                         for c in calls]

    def extract_partial(self, text: str) -> PartialToolCalls:
        """What a partial output shows so far: content that is final, and the calls begun."""
        if self.parser is None:
            return PartialToolCalls(len(text))
        found = self.parser.extract_partial(text)
        if not self.parallel:
            found.calls = found.calls[:1]
        return found


def plan_tools(req: ChatCompletionRequest, config: ServeConfig) -> ToolPlan:
    """Check the request's tools and tool_choice; 400 naming a malformed tool or an unusable choice."""
    tools = req.tools or []
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if not tools:
        if choice not in ("none", "auto"):
            raise InvalidArgumentError("tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    names = [t.function.name for t in tools]
    for i, tool in enumerate(tools):
        params = _parameters(tool)
        where = f"tools[{i}].function.parameters"
        if params.get("type", "object") != "object":
            raise InvalidArgumentError(f"{where} must be a JSON schema of type object", param=where)
        check_structured_outputs(StructuredOutputsParams(json=params), param=where)
    dicts = [tool.model_dump(exclude_none=True) for tool in tools]
    if choice == "none":
        return ToolPlan("none", dicts)
    if choice == "auto":
        if not (config.enable_auto_tool_choice and config.tool_call_parser):
            raise InvalidArgumentError('"auto" tool choice requires the server to run with '
                                       "--enable-auto-tool-choice and --tool-call-parser", param="tool_choice")
        return ToolPlan("auto", dicts, parser=get_tool_parser(config.tool_call_parser, dicts),
                        parallel=req.parallel_tool_calls)
    if choice == "required":
        defs: dict[str, Any] = {}
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                              "parameters": _nested_parameters(t, i, defs)},
             "required": ["name", "parameters"]} for i, t in enumerate(tools)]}}
        if not req.parallel_tool_calls:
            schema["maxItems"] = 1
        if defs:
            schema["$defs"] = defs
        return ToolPlan("required", dicts, StructuredOutputsParams(json=schema), _RequiredToolParser())
    name = choice.function.name
    if name not in names:
        raise InvalidArgumentError(f"tool_choice names function {name!r}, which is not among the tools",
                                   param="tool_choice")
    tool = tools[names.index(name)]
    return ToolPlan("named", dicts, StructuredOutputsParams(json=_parameters(tool)), _NamedToolParser(name))


def _nested_parameters(tool, i: int, defs: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters as one branch of the "required" array schema. Their local references ("#/$defs/X",
    as pydantic writes nested models, or "#" itself) point into the parameters, not into the array around
    them: such parameters move to the array's $defs whole, under a name of their own, and their references
    are rewritten to point there."""
    params = _parameters(tool)
    name = f"tool_{i}_parameters"
    rebased = _rebase_refs(params, f"#/$defs/{name}")
    if rebased == params:  # no local reference: inline, as before
        return params
    defs[name] = rebased
    return {"$ref": f"#/$defs/{name}"}


_DATA_KEYWORDS = ("enum", "const", "default", "examples")  # their values are JSON data, not schemas
_NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions")  # names (data) -> schemas


def _rebase_refs(schema: Any, base: str) -> Any:
    """The schema with each local $ref ("#...") made relative to base instead of to its root."""
    if isinstance(schema, list):
        return [_rebase_refs(v, base) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "$ref" and isinstance(v, str) and v.startswith("#"):
            out[k] = base + v[1:]
        elif k in _NAMED_SCHEMAS and isinstance(v, dict):
            out[k] = {name: _rebase_refs(sub, base) for name, sub in v.items()}
        else:
            out[k] = v if k in _DATA_KEYWORDS else _rebase_refs(v, base)
    return out


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates read them: tool calls with their arguments as objects (HF templates index
    them), tool results with their call id, content as given: a string, None, or its text parts apart (each
    {"type": "text", "text": ...}), which with_content_format (chat_content_format.py) joins for a template that
    reads a string or keeps apart for one that loops over them, as vLLM does."""
    out = []
    for m in messages:
        content = m.content if not isinstance(m.content, list) else [
            {"type": "text", "text": part.text} for part in m.content]
        msg: dict[str, Any] = {"role": m.role, "content": content}
        if m.name:
            msg["name"] = m.name
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments_object(c.function.arguments)}}
                for c in m.tool_calls]
        out.append(msg)
    return out


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
