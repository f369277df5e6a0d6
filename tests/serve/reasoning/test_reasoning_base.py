"""The reasoning state machine of meshserve/serve/reasoning/base.py, in text mode (tags that are not single
tokens) and token mode (tags that are), whole and streamed with every split."""

from __future__ import annotations

import pytest

from meshserve.serve.reasoning import get_reasoning_parser
from tests.reasoning_model import reasoning_tokenizer
from tests.serve.reasoning.split_check import check_every_split, stream_split

# (output, starts inside the span, (reasoning, content)): the rules of base.py's docstring
CASES = [
    ("<think>Let me see.</think>\n\nParis", True, ("Let me see.", "\n\nParis")),
    ("Let me see.</think>\n\nParis", True, ("Let me see.", "\n\nParis")),  # the prompt opened the span
    ("Let me see, x < y", True, ("Let me see, x < y", None)),  # never closed: all reasoning
    ("<think>a</think>", True, ("a", None)),
    ("<think></think>Paris", True, (None, "Paris")),
    ("<think>a</th>b</think>c <b>", True, ("a</th>b", "c <b>")),  # a near-tag is text
    ("Paris </think> x", False, (None, "Paris </think> x")),  # the prompt closed the span: all content
    ("<think>a</think>b", False, ("a", "b")),  # ...unless the output opens it again
    ("<thin", False, (None, "<thin")),  # the start of a tag at the very end is text after all
    ("<thin", True, ("<thin", None)),
    ("", True, (None, None)),
]


@pytest.fixture(scope="module")
def tokenizer():
    return reasoning_tokenizer()


@pytest.mark.parametrize("text,in_reasoning,expected", CASES)
def test_text_mode_every_split(text, in_reasoning, expected):
    parser = get_reasoning_parser("deepseek_r1")  # no tokenizer: text mode
    assert not parser.token_mode
    check_every_split(parser, text, None, in_reasoning, expected)


@pytest.mark.parametrize("text,in_reasoning,expected", CASES)
def test_token_mode_every_split(tokenizer, text, in_reasoning, expected):
    parser = get_reasoning_parser("deepseek_r1", tokenizer)
    assert parser.token_mode and parser.end_id == tokenizer.convert_tokens_to_ids("</think>")
    parser._test_tokenizer = tokenizer
    ids = tokenizer(text).input_ids
    check_every_split(parser, text, ids, in_reasoning, expected)


def test_token_mode_counts_a_tag_only_where_its_token_is(tokenizer):
    """"</think>" spelled with ordinary tokens (a model writing about tags) does not close the span in token
    mode; in text mode any occurrence does."""
    ids = tokenizer("x ").input_ids + tokenizer.convert_tokens_to_ids(list("</think>")) \
        + tokenizer(" y").input_ids
    text = tokenizer.decode(ids)
    assert "</think>" in text and tokenizer.convert_tokens_to_ids("</think>") not in ids
    assert get_reasoning_parser("qwen3", tokenizer).extract(text, ids, True) == (text, None)
    assert get_reasoning_parser("qwen3").extract(text, [], True) == ("x ", " y")
    assert get_reasoning_parser("qwen3", tokenizer).extract(text, None, True) == ("x ", " y")  # no ids: text


def test_token_mode_text_lagging_its_ids(tokenizer):
    """The detokenizer may hold text back (a stop string's possible start): a delta's ids can carry the end
    tag before its text does. The split waits for the text, whatever the lag."""
    parser = get_reasoning_parser("qwen3", tokenizer)
    think, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    a, b = tokenizer("ab").input_ids, tokenizer("cd").input_ids
    deltas = [("", [think]), ("<think>ab</", a + [end]), ("think>", b), ("cd", [])]
    assert stream_split(parser, deltas, True) == ("ab", "cd")


def test_prompt_state(tokenizer):
    """The last tag of the prompt decides where the output starts; none: the parser's default."""
    parser = get_reasoning_parser("deepseek_r1", tokenizer)
    def ids(text: str) -> list[int]:
        return tokenizer(text).input_ids

    assert parser.prompt_state(ids("<|im_start|>assistant\n<think>\n")) is True
    assert parser.prompt_state(ids("<think>a</think>b<|im_start|>assistant\n<think>\n\n</think>\n\n")) is False
    assert parser.prompt_state(ids("<think>a</think> then <think>\n")) is True
    assert parser.prompt_state(ids("<|im_start|>assistant\n")) is None
    text_parser = get_reasoning_parser("deepseek_r1")
    assert text_parser.prompt_state(prompt_text="x<think>\n\n</think>\n\n") is False
    assert text_parser.prompt_state(prompt_text="x<think>\n") is True
    assert text_parser.prompt_state(prompt_text="x") is None


def test_special_tags_keep_special_tokens():
    """Tags marked special would vanish from text decoded with skip_special_tokens: the parser says so."""
    assert get_reasoning_parser("qwen3", reasoning_tokenizer(special=True)).keeps_special_tokens
    assert not get_reasoning_parser("qwen3", reasoning_tokenizer()).keeps_special_tokens


def test_unknown_parser_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown reasoning parser 'r2'.*deepseek_r1.*qwen3"):
        get_reasoning_parser("r2")
