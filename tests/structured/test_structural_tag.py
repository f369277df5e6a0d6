"""Structural tags (vLLM's response_format {"type": "structural_tag"}): free text whose tagged parts follow
their JSON schemas. vLLM's older {"structures", "triggers"} form means the same as xgrammar's
triggered_tags; both are checked up front (a 400 naming the problem) and compile to grammars that accept
the right strings and refuse the wrong ones."""

from __future__ import annotations

import json

import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.structured.grammar import check_structured_outputs, structural_tag_json
from meshserve.structured.params import StructuredOutputsParams

xgr = pytest.importorskip("xgrammar")
from xgrammar.testing import _is_grammar_accept_string as accepts

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
LEGACY = {"type": "structural_tag", "triggers": ["<function="],
          "structures": [{"begin": "<function=get_weather>", "schema": CITY, "end": "</function>"}]}
CURRENT = {"type": "structural_tag", "format": {"type": "tag", "begin": "<answer>", "end": "</answer>",
                                               "content": {"type": "json_schema", "json_schema": CITY}}}


def _grammar(tag: dict):
    params = StructuredOutputsParams(structural_tag=tag)
    check_structured_outputs(params)
    return xgr.Grammar.from_structural_tag(structural_tag_json(params.key[1]))


def test_legacy_structures_constrain_only_what_follows_a_trigger():
    g = _grammar(LEGACY)
    assert accepts(g, 'Let me look. <function=get_weather>{"city": "Paris"}</function> Done.')
    assert accepts(g, "No call at all.")
    assert not accepts(g, '<function=get_weather>{"town": "Paris"}</function>')  # schema broken
    assert not accepts(g, '<function=get_time>{"city": "Paris"}</function>')  # no such tag


def test_current_format_is_passed_through():
    g = _grammar(CURRENT)
    assert accepts(g, '<answer>{"city": "Oslo"}</answer>')
    assert not accepts(g, 'Sure: <answer>{"city": "Oslo"}</answer>')


@pytest.mark.parametrize("tag,words", [
    ({**LEGACY, "triggers": []}, "triggers must be"),
    ({**LEGACY, "structures": [{"begin": "<function=f>", "end": "</function>"}]}, "schema object"),
    ({**LEGACY, "structures": [{"begin": "<x>", "schema": CITY, "end": "</x>"}]}, "none of the triggers"),
    ({**LEGACY, "structures": [{"begin": "<function=f>", "schema": {"not": {}}, "end": "</f>"}]}, "'not'"),
    ({**LEGACY, "structures": [{"begin": "<function=f>", "schema": {"type": "nonsense"}, "end": "</f>"}]},
     "nonsense"),
    ({"type": "structural_tag", "format": {"type": "nope"}}, "nope"),
    ({"type": "structural_tag"}, "format"),
])
def test_bad_structural_tags_are_invalid_arguments(tag, words):
    with pytest.raises(InvalidArgumentError) as e:
        check_structured_outputs(StructuredOutputsParams(structural_tag=json.dumps(tag)), param="response_format")
    assert words in str(e.value) and "structural tag" in str(e.value) and e.value.param == "response_format"
