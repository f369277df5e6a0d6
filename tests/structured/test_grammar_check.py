"""Constraints are checked before they reach the engine: a bad one is an InvalidArgumentError that says what
is wrong (xgrammar's own words, without its C++ source location) and names the field it came in."""

from __future__ import annotations

import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.sampling import SamplingParams
from meshserve.structured.grammar import check_structured_outputs
from meshserve.structured.params import StructuredOutputsParams

BAD = [
    ({"json": '{"type": '}, "not valid JSON"),
    ({"json": {"type": "foo"}}, 'Unsupported type "foo"'),
    ({"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "minimum greater than maximum"),
    ({"json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}, "missing"),
    ({"json": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}, "'not'"),
    ({"json": '[1, 2]'}, "must be an object"),
    ({"regex": "[a-"}, "Unclosed '['"),
    ({"regex": "(?<=a)b"}, "Lookbehind is not supported"),
    ({"grammar": "root ::= undefined_rule"}, 'Rule "undefined_rule" is not defined'),
    ({"grammar": "nonsense"}, 'root rule with name "root" is not found'),
]


@pytest.mark.parametrize("fields,message", BAD, ids=[m for _, m in BAD])
def test_bad_constraints_are_invalid_arguments_naming_the_problem(fields, message):
    with pytest.raises(InvalidArgumentError) as e:
        check_structured_outputs(StructuredOutputsParams(**fields), param="response_format")
    assert message in str(e.value) and e.value.param == "response_format"
    assert ".cc:" not in str(e.value)  # no C++ source location


def test_exactly_one_constraint():
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(InvalidArgumentError, match="non-empty list"):
        StructuredOutputsParams(choice=[])


def test_good_constraints_pass_and_property_names_are_not_keywords():
    for fields in ({"json": {"type": "object", "properties": {"not": {"type": "string"}, "if": {"enum": [1]}}}},
                   {"json_object": True}, {"regex": r"\d+"}, {"choice": ['say "hi"', "é"]},
                   {"grammar": 'root ::= "a" | "b"'}):
        check_structured_outputs(StructuredOutputsParams(**fields))


def test_sampling_params_take_a_dict_and_keep_schema_key_order():
    p = SamplingParams(structured_outputs={"json": {"properties": {"b": {}, "a": {}}}})
    assert p.uses_grammar and p.structured_outputs.json == '{"properties":{"b":{},"a":{}}}'
    assert not SamplingParams().uses_grammar
