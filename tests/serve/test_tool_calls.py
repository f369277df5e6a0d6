"""tool_choice "required" constrains the output to one or more calls of the given tools, at most one when
parallel_tool_calls is false; the grammar it builds accepts exactly that."""

from __future__ import annotations

import json

import pytest

from meshserve.serve.config import ServeConfig
from meshserve.serve.protocol import ChatCompletionRequest
from meshserve.serve.tool_calls import plan_tools
from meshserve.structured.grammar import compile_structured_outputs

xgr = pytest.importorskip("xgrammar")
from xgrammar.testing import _is_grammar_accept_string as accepts

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
    {"type": "function", "function": {"name": "g"}}]


def _grammar(parallel: bool):
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                "tools": TOOLS, "tool_choice": "required",
                                                "parallel_tool_calls": parallel})
    plan = plan_tools(req, ServeConfig())
    kind, spec = plan.constraint.key
    assert kind == "json"
    return plan, xgr.Grammar.from_json_schema(spec, any_whitespace=False)


def test_required_allows_several_calls_only_when_parallel():
    one = json.dumps([{"name": "f", "parameters": {"a": 1}}])
    two = json.dumps([{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}])
    plan, parallel = _grammar(True)
    assert accepts(parallel, one) and accepts(parallel, two) and not accepts(parallel, "[]")
    assert not accepts(parallel, json.dumps([{"name": "f", "parameters": {"b": 1}}]))  # f's schema holds
    assert not accepts(parallel, json.dumps([{"name": "h", "parameters": {}}]))  # only the given tools
    assert [c.function.name for c in plan.extract(two)[1]] == ["f", "g"]
    _, single = _grammar(False)
    assert accepts(single, one) and not accepts(single, two)


def test_compile_structured_outputs_is_what_the_engine_runs():
    """The engine compiles the same constraint against a vocabulary (here a toy byte vocabulary)."""
    plan, _ = _grammar(True)
    info = xgr.TokenizerInfo([chr(i) for i in range(32, 127)] + ["</s>"], stop_token_ids=[95])
    compiled = compile_structured_outputs(xgr.GrammarCompiler(info), plan.constraint)
    matcher = xgr.GrammarMatcher(compiled)
    for ch in '[{"name": "g", "parameters": {}}]':
        assert matcher.accept_token(ord(ch) - 32), ch
    assert matcher.accept_token(95) and matcher.is_terminated()


@pytest.mark.parametrize("text, calls", [
    # cut by max_tokens in the second call (tests/serve/test_responses_differential.py, seed 19 request 13)
    ('[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "par', [("f", '{"a": 1}'), ("g", "")]),
    ('[{"name": "f", "parameters": {"a": 1', [("f", '{"a": 1')]),
    # complete, but not JSON: the grammar let a raw control character into a string (seed 5 request 7)
    ('[{"name": "f", "parameters": {"a": "x\x1ay"}}]', [("f", '{"a": "x\x1ay"}')]),
])
def test_required_output_cut_short_is_the_calls_begun_as_streamed(text, calls):
    """Whole and streamed answers agree: the stream has sent every call whose name was complete, so the whole
    answer carries those calls too (their arguments as far as written), not the raw text."""
    from meshserve.serve.tool_call_stream import ToolCallStream

    plan, _ = _grammar(True)
    content, whole = plan.extract(text)
    assert content is None and [(c.function.name, c.function.arguments) for c in whole] == calls
    stream = ToolCallStream(plan)
    sent: dict[int, list[str]] = {}
    for end in range(1, len(text) + 1):
        step_content, deltas = stream.step(text[:end]) if end < len(text) else stream.finish(text)[:2]
        assert not step_content
        for d in deltas:
            sent.setdefault(d.index, ["", ""])
            sent[d.index][0] += d.function.name or ""
            sent[d.index][1] += d.function.arguments or ""
    assert [tuple(v) for _, v in sorted(sent.items())] == calls
    assert plan.extract('[{"name": "f') == ('[{"name": "f', [])  # no name complete: no call, the text


def test_required_keeps_each_tools_local_references():
    """A tool whose parameters reference their own $defs (openai.pydantic_function_tool of a nested model) or
    themselves ("#"): under "required" those references still resolve to the tool's parameters, not to the
    array schema around them (was a 400: "Cannot find field '$defs' in #/$defs/Loc")."""
    loc = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}
    nested = {"type": "function", "function": {"name": "weather", "parameters": {
        "$defs": {"Loc": loc}, "type": "object", "properties": {"loc": {"$ref": "#/$defs/Loc"}},
        "required": ["loc"], "additionalProperties": False}}}
    tree = {"type": "function", "function": {"name": "tree", "parameters": {
        "type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#"},
                                         "$ref": {"enum": ["#/x"]}},  # a property named $ref; data
        "required": ["v"], "additionalProperties": False}}}
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                "tools": [TOOLS[1], nested, tree], "tool_choice": "required"})
    plan = plan_tools(req, ServeConfig())
    grammar = xgr.Grammar.from_json_schema(plan.constraint.key[1], any_whitespace=False)
    assert accepts(grammar, json.dumps([{"name": "weather", "parameters": {"loc": {"city": "Paris"}}},
                                        {"name": "g", "parameters": {}}]))
    assert not accepts(grammar, json.dumps([{"name": "weather", "parameters": {"loc": {"town": "Paris"}}}]))
    assert accepts(grammar, json.dumps([{"name": "tree",
                                         "parameters": {"v": 1, "next": {"v": 2}, "$ref": "#/x"}}]))
    assert not accepts(grammar, json.dumps([{"name": "tree", "parameters": {"v": 1, "next": {"w": 2}}}]))
    assert '"g"' in plan.constraint.key[1]  # parameters without references stay inline
