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
    ({"grammar": "nonsense"}, "expected `name: definition`"),
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


def test_a_backend_that_does_not_import_is_one_clear_error(monkeypatch):
    # an install whose xgrammar cannot import (the device once lacked its apache-tvm-ffi): the check answers the
    # request with one line naming the package, not the import's traceback; so does the core's compile
    from meshserve.structured.compiler import GrammarCompiler

    monkeypatch.setitem(__import__("sys").modules, "xgrammar", None)
    params = StructuredOutputsParams(regex="[0-9]{3} no-backend")  # a spec no other test has cached
    with pytest.raises(InvalidArgumentError, match="xgrammar does not import") as e:
        check_structured_outputs(params, param="response_format")
    assert e.value.param == "response_format" and "\n" not in str(e.value)
    compiler = GrammarCompiler("unused", vocab_size=100, eos_token_ids=[0])
    try:
        with pytest.raises(InvalidArgumentError, match="pip install xgrammar"):
            compiler.submit(params).result(timeout=30)
    finally:
        compiler.shutdown()


@pytest.mark.parametrize("schema, words", [
    # xgrammar 0.2.9 drops these with a warning only; the output would break them
    ({"type": "string", "format": "email", "maxLength": 20}, "'maxLength' with 'format' (at #/properties/v/maxLength)"),
    ({"type": "string", "pattern": "^a+$", "minLength": 2}, "'minLength' with 'pattern'"),
    ({"type": ["number", "null"], "multipleOf": 0.5}, "'multipleOf' (of a number)"),
    ({"type": "integer", "multipleOf": 3, "minimum": 1}, "'multipleOf' with a bound on one side only"),
])
def test_keywords_xgrammar_ignores_in_company_are_refused(schema, words):
    with pytest.raises(InvalidArgumentError) as e:
        check_structured_outputs(StructuredOutputsParams(json={"type": "object", "properties": {"v": schema}}),
                                 param="response_format")
    assert words in str(e.value) and "not supported" in str(e.value)


def test_keywords_xgrammar_enforces_alone_pass():
    for schema in ({"type": "string", "maxLength": 5}, {"type": "string", "format": "email"},
                   {"type": "string", "format": "not-a-known-format", "maxLength": 5},  # no format regex: enforced
                   {"type": "integer", "multipleOf": 3}, {"type": "integer", "multipleOf": 3, "minimum": 1,
                                                          "maximum": 99}, {"type": "string", "pattern": "^a+$"}):
        check_structured_outputs(StructuredOutputsParams(json={"type": "object", "properties": {"v": schema}}))
