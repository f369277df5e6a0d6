"""deepseek_r1: vLLM's rules. The template may have opened <think> in the prompt, so an output without a
start tag is reasoning up to </think>, and an output that never writes </think> is all reasoning;
enable_thinking is not this parser's switch (R1 always thinks)."""

from __future__ import annotations

import pytest

from meshserve.serve.reasoning import get_reasoning_parser
from tests.reasoning_model import reasoning_tokenizer
from tests.serve.reasoning.split_check import check_every_split


@pytest.fixture(scope="module")
def tokenizer():
    return reasoning_tokenizer()


def test_starts_inside_the_span_whatever_the_kwargs(tokenizer):
    parser = get_reasoning_parser("deepseek_r1", tokenizer)
    prompt = tokenizer("<|im_start|>assistant\n").input_ids
    assert parser.starts_in_reasoning(None, prompt)
    assert parser.starts_in_reasoning({"enable_thinking": False}, prompt)


@pytest.mark.parametrize("text,expected", [
    ("First, 9.8 > 9.11.\n</think>\n\n9.8 is greater.", ("First, 9.8 > 9.11.\n", "\n\n9.8 is greater.")),
    ("<think>\nOK.\n</think>Yes", ("\nOK.\n", "Yes")),  # R1-0528 writes the start tag itself
    ("still thinking when max_tokens hit", ("still thinking when max_tokens hit", None)),
    ("</think>direct", (None, "direct")),
])
def test_outputs(tokenizer, text, expected):
    parser = get_reasoning_parser("deepseek_r1", tokenizer)
    parser._test_tokenizer = tokenizer
    check_every_split(parser, text, tokenizer(text).input_ids, True, expected)
    text_parser = get_reasoning_parser("deepseek_r1")  # the same without single-token tags
    check_every_split(text_parser, text, None, True, expected)
