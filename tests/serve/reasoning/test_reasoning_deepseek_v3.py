"""deepseek_v3 (DeepSeek-V3.1's hybrid thinking): vLLM 0.26's rules. chat_template_kwargs `thinking` (or
`enable_thinking`) true: deepseek_r1's reading; otherwise the whole output is content, no tag looked for (vLLM's
identity parser), and a structured output holds from the first token."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from meshserve.serve.reasoning import REASONING_PARSERS, get_reasoning_parser
from meshserve.serve.reasoning.chat import plan_reasoning
from meshserve.structured.params import StructuredOutputsParams
from tests.reasoning_model import reasoning_tokenizer
from tests.serve.reasoning.split_check import check_every_split

THINKING_ON = [{"thinking": True}, {"enable_thinking": True}, {"thinking": False, "enable_thinking": True},
               {"thinking": 1}]
THINKING_OFF = [None, {}, {"thinking": False}, {"enable_thinking": False}, {"thinking": None}]


@pytest.fixture(scope="module")
def tokenizer():
    return reasoning_tokenizer()


def test_registered():
    assert "deepseek_v3" in REASONING_PARSERS
    from meshserve.cli import build_parser
    from meshserve.serve.cli import serve_config_from

    ns = build_parser(["serve"]).parse_args(["serve", "some/model", "--reasoning-parser", "deepseek_v3"])
    assert serve_config_from(ns, "some/model").reasoning_parser == "deepseek_v3"


@pytest.mark.parametrize("kwargs", THINKING_ON)
def test_thinking_reads_as_deepseek_r1(tokenizer, kwargs):
    parser, r1 = get_reasoning_parser("deepseek_v3", tokenizer), get_reasoning_parser("deepseek_r1", tokenizer)
    opened = tokenizer("<|im_start|>assistant\n<think>").input_ids  # V3.1's template opens the span
    assert parser.starts_in_reasoning(kwargs, opened) is True
    assert parser.starts_in_reasoning(kwargs, tokenizer("</think>").input_ids) is False  # a prompt that closed it
    parser._test_tokenizer = tokenizer
    for text in ("Rome is in Italy.</think>\n\nSunny.", "<think>\nOK.\n</think>Yes", "cut short by max_tok",
                 "</think>direct"):
        expected = r1.extract(text, tokenizer(text).input_ids, True)
        check_every_split(parser, text, tokenizer(text).input_ids, True, expected)
    assert parser.extract("Rome.</think>Sunny.", None, True) == ("Rome.", "Sunny.")


@pytest.mark.parametrize("kwargs", THINKING_OFF)
def test_without_thinking_the_output_is_not_read(tokenizer, kwargs):
    """All content, as written, whatever the prompt says: no plan, as without a parser (tests below: served)."""
    for parser in (get_reasoning_parser("deepseek_v3", tokenizer), get_reasoning_parser("deepseek_v3")):
        assert parser.reads(kwargs) is False
        plan, _ = _plan(parser, kwargs)
        assert plan is None
    assert get_reasoning_parser("deepseek_r1", tokenizer).reads(kwargs) is True


def _plan(parser, kwargs):
    req = SimpleNamespace(chat_template_kwargs=kwargs, include_reasoning=True, response_format=None)
    params = SimpleNamespace(skip_special_tokens=True, structured_outputs=StructuredOutputsParams(json={}))
    plan = asyncio.run(plan_reasoning(parser, req, [1, 2], params, client=None))
    return plan, params.structured_outputs.reasoning_end_token_id


def test_structured_outputs_wait_only_for_a_thought(tokenizer):
    parser = get_reasoning_parser("deepseek_v3", tokenizer)
    end_id = tokenizer.convert_tokens_to_ids("</think>")
    plan, waits_for = _plan(parser, {"thinking": True})
    assert waits_for == end_id and plan.split("Hmm.</think>{}", None) == ("Hmm.", "{}")
    plan, waits_for = _plan(parser, None)
    assert plan is None and waits_for is None  # thinking off: the constraint holds from the first token
