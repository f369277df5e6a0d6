"""Tool-call parsers read whole outputs as vLLM's do, and while streaming hold back only text that may
still become a tool call."""

from __future__ import annotations

import json

from meshserve.serve.tool_parsers import get_tool_parser


def test_hermes_extracts_calls_and_leading_content():
    p = get_tool_parser("hermes")
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = p.extract(text)
    assert content == "Let me check.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                   ("get_time", {})]
    assert p.extract("no tools here") == ("no tools here", [])
    # a malformed call leaves the whole output as text
    assert p.extract("<tool_call>{not json</tool_call>") == ("<tool_call>{not json</tool_call>", [])
    # unterminated (cut by max_tokens) but complete JSON still counts
    assert p.extract('<tool_call>{"name": "f", "arguments": {"x": 1}}')[1][0].arguments == '{"x": 1}'


def test_hermes_streaming_holds_back_a_possible_marker_only():
    p = get_tool_parser("hermes")
    assert p.content_prefix_len("Hello") == 5
    assert p.content_prefix_len("Hello <tool") == len("Hello ")
    assert p.content_prefix_len("Hello <tool_call>{") == len("Hello ")
    assert p.content_prefix_len("a < b") == 5


def test_llama3_json_extracts_whole_message_calls():
    p = get_tool_parser("llama3_json")
    content, calls = p.extract('<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1}), ("g", {})]
    assert p.extract("The answer is 4.") == ("The answer is 4.", [])
    assert p.extract('{"no_name": 1}') == ('{"no_name": 1}', [])
    assert p.content_prefix_len("  {") == 0 and p.content_prefix_len("Sure") == 4
