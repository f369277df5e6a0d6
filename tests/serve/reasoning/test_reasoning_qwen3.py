"""qwen3: vLLM's rules. A missing </think> means a cut-short thought (all reasoning) unless thinking was
disabled (enable_thinking=False: all content); a prompt that closed the span (the template with thinking
disabled) starts the output as content."""

from __future__ import annotations

import pytest

from meshserve.engine.chat_template import render_chat
from meshserve.serve.reasoning import get_reasoning_parser
from tests.reasoning_model import reasoning_tokenizer
from tests.serve.reasoning.split_check import check_every_split


@pytest.fixture(scope="module")
def tokenizer():
    return reasoning_tokenizer()


@pytest.mark.parametrize("kwargs,expected", [(None, True), ({}, True), ({"enable_thinking": True}, True),
                                             ({"enable_thinking": False}, False)])
def test_where_the_output_starts_without_tags_in_the_prompt(tokenizer, kwargs, expected):
    parser = get_reasoning_parser("qwen3", tokenizer)
    assert parser.starts_in_reasoning(kwargs, tokenizer("<|im_start|>assistant\n").input_ids) is expected


def test_template_with_thinking_disabled_closes_the_span(tokenizer):
    parser = get_reasoning_parser("qwen3", tokenizer)
    prompt = render_chat(tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True,
                         template_kwargs={"enable_thinking": False})  # as the server renders it
    assert not parser.starts_in_reasoning({"enable_thinking": False}, prompt)
    assert not parser.starts_in_reasoning(None, prompt)  # the prompt alone says so


@pytest.mark.parametrize("text,kwargs,expected", [
    ("<think>\nHmm.\n</think>\n\nParis.", None, ("\nHmm.\n", "\n\nParis.")),
    ("Hmm.</think>Paris.", None, ("Hmm.", "Paris.")),
    ("Hmm, the capital", None, ("Hmm, the capital", None)),  # cut short
    ("Paris.", {"enable_thinking": False}, (None, "Paris.")),
    ("<think>Hmm.</think>Paris.", {"enable_thinking": False}, ("Hmm.", "Paris.")),
])
def test_outputs(tokenizer, text, kwargs, expected):
    parser = get_reasoning_parser("qwen3", tokenizer)
    parser._test_tokenizer = tokenizer
    start = parser.starts_in_reasoning(kwargs, tokenizer("<|im_start|>assistant\n").input_ids)
    check_every_split(parser, text, tokenizer(text).input_ids, start, expected)


XML_CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"


@pytest.mark.parametrize("text,expected", [
    # Qwen3.5 opens an XML call inside its thought: the call ends the reasoning and is content
    ("I will check.\n" + XML_CALL, ("I will check.\n", XML_CALL)),
    ("Hmm <tool_call> <function " + "x", ("Hmm ", "<tool_call> <function x")),
    # a <tool_call> not followed by <function stays reasoning (Hermes JSON in a thought, prose)
    ('Maybe <tool_call>{"name": "f"}</tool_call>?</think>No.', ('Maybe <tool_call>{"name": "f"}</tool_call>?', "No.")),
    ("About <tool_call> tags, <function", ("About <tool_call> tags, <function", None)),
    ("Cut at <tool_call>\n<functio", ("Cut at <tool_call>\n<functio", None)),  # never confirmed: reasoning
    ("Done.</think>" + XML_CALL, ("Done.", XML_CALL)),
])
def test_xml_tool_call_ends_the_reasoning(tokenizer, text, expected):
    parser = get_reasoning_parser("qwen3", tokenizer)
    parser._test_tokenizer = tokenizer
    check_every_split(parser, text, tokenizer(text).input_ids, True, expected)
    check_every_split(get_reasoning_parser("qwen3"), text, None, True, expected)  # text mode alike


def test_deepseek_r1_has_no_implicit_end():
    text = "I will check.\n" + XML_CALL
    assert get_reasoning_parser("deepseek_r1").extract(text, None, True) == (text, None)
