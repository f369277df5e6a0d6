"""Structured outputs against vLLM 0.26 (xgrammar backend): each input form is accepted and compiled to the same
language, or refused with a 400 (InvalidArgumentError / pydantic's ValidationError) naming the field."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from meshserve.errors import InvalidArgumentError
from meshserve.serve.protocol import CompletionRequest
from meshserve.serve.structured_request import structured_outputs_of
from meshserve.structured.grammar import (
    check_structured_outputs,
    choice_ebnf,
    grammar_ebnf,
    grammar_is_lark,
    lark_to_ebnf,
    structural_tag_json,
)
from meshserve.structured.params import StructuredOutputsParams

xgr = pytest.importorskip("xgrammar")

# a byte-level vocabulary of printable ASCII, tab and newline: any string can be fed one character at a time
_VOCAB = [chr(i) for i in range(32, 127)] + ["\n", "\t", "</s>"]


@pytest.fixture(scope="module")
def compiler():
    info = xgr.TokenizerInfo(_VOCAB, stop_token_ids=[len(_VOCAB) - 1])
    return xgr.GrammarCompiler(info)



def _full(compiled, text: str) -> bool:
    """Whether the grammar accepts exactly `text` (then the stop token)."""
    m = xgr.GrammarMatcher(compiled)
    return m.accept_string(text) and m.accept_token(len(_VOCAB) - 1)


def _req(**fields):
    return structured_outputs_of(CompletionRequest(model="m", prompt="hi", **fields))


def _refused(param: str, **fields) -> str:
    with pytest.raises(InvalidArgumentError) as e:
        _req(**fields)
    assert e.value.param == param
    return str(e.value)


# -- JSON schemas -------------------------------------------------------------------------------------
@pytest.mark.parametrize("schema", [
    {"type": "array", "uniqueItems": True, "items": {"type": "integer"}},
    {"type": "array", "contains": {"type": "integer"}},
    {"type": "object", "propertyNames": {"pattern": "^a"}},
    {"type": "number", "multipleOf": 0.5},
    {"type": "integer", "multipleOf": 3, "minimum": 0},  # one-sided: xgrammar drops multipleOf
    {"not": {"type": "string"}},
])
def test_schema_features_xgrammar_does_not_enforce_are_refused(schema):
    # vLLM 0.26 (backend xgrammar) refuses "features not supported by xgrammar"; meshserve names the keyword
    msg = _refused("structured_outputs", structured_outputs={"json": schema})
    assert "not supported" in msg


def test_schema_pattern_properties_is_enforced(compiler):
    # vLLM lists patternProperties as unsupported (auto: falls back to guidance); xgrammar 0.2.9 enforces it
    params = _req(structured_outputs={"json": {"type": "object", "patternProperties": {"^a": {"type": "integer"}}}})
    compiled = compiler.compile_json_schema(params.json, any_whitespace=False)
    assert _full(compiled, '{"a": 1}') and not _full(compiled, '{"b": 1}') and not _full(compiled, '{"a": "x"}')


def test_schema_refs_defs_and_additional_properties_default(compiler):
    schema = {"$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
              "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"]}
    params = _req(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    compiled = compiler.compile_json_schema(params.json, any_whitespace=False)
    assert _full(compiled, '{"p": {"x": 1}}')
    assert not _full(compiled, '{"p": {"x": 1}, "q": 2}')  # xgrammar's strict mode: no extra properties
    assert not _full(compiled, '{"p": {"x": "1"}}')


def test_schema_as_string_in_structured_outputs_and_refused_in_response_format():
    assert _req(structured_outputs={"json": '{"type": "integer"}'}).json == '{"type": "integer"}'
    # vLLM: schema is a dict in JsonSchemaResponseFormat (a 400 too)
    _refused("response_format.json_schema.schema",
             response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": "{}"}})


def test_bad_json_schema_text_and_empty_string():
    assert "not valid JSON" in _refused("structured_outputs", structured_outputs={"json": "{nope"})
    assert "empty" in _refused("structured_outputs", structured_outputs={"json": "  "})


def test_response_format_json_schema_forms(compiler):
    # "strict" is accepted and changes nothing (vLLM ignores it too)
    strict = _req(response_format={"type": "json_schema",
                                   "json_schema": {"name": "n", "strict": False, "schema": {"type": "integer"}}})
    assert json.loads(strict.json) == {"type": "integer"}
    # an empty schema is any JSON value (vLLM passes {} to xgrammar as it is)
    anything = _req(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {}}})
    assert json.loads(anything.json) == {}
    assert _full(compiler.compile_json_schema(anything.json, any_whitespace=False), '"s"')
    # no schema: any object (OpenAI's reading; vLLM 0.26 answers 400 "none specified")
    assert json.loads(_req(response_format={"type": "json_schema", "json_schema": {"name": "n"}}).json) == \
        {"type": "object"}
    # no json_schema object at all: a 400 in both
    _refused("response_format.json_schema", response_format={"type": "json_schema"})


def test_json_object(compiler):
    params = _req(response_format={"type": "json_object"})
    assert params.key == ("json_object", "")
    assert _req(structured_outputs={"json_object": True}).key == ("json_object", "")
    # vLLM: json_object=False is a 400 ("must be True if set"), alone or beside another constraint
    _refused("structured_outputs", structured_outputs={"json_object": False})
    _refused("structured_outputs", structured_outputs={"json_object": False, "regex": "a"})


# -- regular expressions ------------------------------------------------------------------------------
@pytest.mark.parametrize("regex,word", [
    (r"(?=a)b", "Lookahead"), (r"(?<=a)b", "Lookbehind"), (r"(a)\1", "Backreference"),
    (r"(?i)abc", "Group modifier"), (r"\bfoo", "Word boundary"), ("[a-", "Unclosed"),
])
def test_regex_syntax_xgrammar_rejects(regex, word):
    msg = _refused("structured_outputs", structured_outputs={"regex": regex})
    assert msg.startswith("invalid regular expression") and word in msg


def test_regex_accepted(compiler):
    params = _req(structured_outputs={"regex": r"\d{2,3}-(?:ab)+"})
    assert _full(compiler.compile_regex(params.regex), "12-abab")


# -- choice -------------------------------------------------------------------------------------------
def test_choice_special_characters_and_empty_string(compiler):
    choices = ['say "hi"', "back\\slash", "two\nlines", "", "ünï"]
    params = _req(structured_outputs={"choice": choices})
    compiled = compiler.compile_grammar(choice_ebnf(json.loads(params.key[1])))
    for c in choices[:4]:
        assert _full(compiled, c), c
    assert not _full(compiled, "say hi")


def test_choice_empty_list_refused():
    _refused("structured_outputs", structured_outputs={"choice": []})
    _refused("guided_choice", guided_choice=[])


# -- grammars -----------------------------------------------------------------------------------------
def test_gbnf_grammar_accepted(compiler):
    g = 'root ::= greeting " " [a-z]+\ngreeting ::= "hi" | "hello"'
    assert not grammar_is_lark(g)
    assert _full(compiler.compile_grammar(grammar_ebnf(_req(structured_outputs={"grammar": g}).grammar)), "hi bob")


def test_lark_grammar_converted_like_vllm(compiler):
    lark = '?start: greeting name  // comment\ngreeting: "hi " | \'hello \'\nname: ["dr. "] LETTER+\nLETTER: "a".."z"\n'
    assert grammar_is_lark(lark)
    params = _req(structured_outputs={"grammar": lark})
    compiled = compiler.compile_grammar(grammar_ebnf(params.grammar))
    assert _full(compiled, "hello dr. who") and _full(compiled, "hi x") and not _full(compiled, "hey x")
    assert lark_to_ebnf("rule: 'abc'").splitlines()[0] == "root ::= rule"  # the first rule, or start


@pytest.mark.parametrize("grammar,word", [
    ("start: /[a-z]+/", "regular-expression"), ("%import common.WS\nstart: 'a'", "directive"),
    ("start: \"a\"i", "case-insensitive"), ("start ::= \"a\"", "root"), ("   ", "empty"),
])
def test_grammars_refused(grammar, word):
    assert word in _refused("structured_outputs", structured_outputs={"grammar": grammar})


# -- structural tags ----------------------------------------------------------------------------------
_LEGACY = {"structures": [{"begin": "<f>", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
                           "end": "</f>"}], "triggers": ["<f"]}


def test_structural_tag_legacy_form_matches_xgrammar_legacy_call():
    ours = json.loads(structural_tag_json(json.dumps(_LEGACY)))
    theirs = json.loads(xgr.StructuralTag.from_legacy_structural_tag(
        [xgr.StructuralTagItem(begin="<f>", schema=json.dumps(_LEGACY["structures"][0]["schema"]), end="</f>")],
        ["<f"]).model_dump_json())
    assert ours["format"]["triggers"] == theirs["format"]["triggers"]
    (t_ours,), (t_theirs,) = ours["format"]["tags"], theirs["format"]["tags"]
    assert (t_ours["begin"], t_ours["end"], t_ours["content"]["json_schema"]) == \
        (t_theirs["begin"], t_theirs["end"], t_theirs["content"]["json_schema"])
    assert not theirs["format"]["at_least_one"] and not theirs["format"]["stop_after_first"]


def test_structural_tag_both_forms_accepted(compiler):
    legacy = _req(response_format={"type": "structural_tag", **_LEGACY})
    compiled = compiler.compile_structural_tag(structural_tag_json(legacy.structural_tag))
    assert _full(compiled, 'text <f>{"a": 1}</f> more')
    new = {"type": "structural_tag", "format": {"type": "const_string", "value": "ok"}}
    params = _req(structured_outputs={"structural_tag": json.dumps(new)})
    assert _full(compiler.compile_structural_tag(structural_tag_json(params.structural_tag)), "ok")
    assert _req(response_format=new).structural_tag


def test_structural_tag_refusals():
    _refused("response_format", response_format={"type": "structural_tag", "format": {"type": "nope"}})
    _refused("structured_outputs", structured_outputs={"structural_tag": "{not json"})


# -- one constraint, options, deprecated fields -------------------------------------------------------
def test_exactly_one_constraint():
    _refused("structured_outputs", structured_outputs={"regex": "a", "choice": ["a"]})
    with pytest.raises(InvalidArgumentError):
        StructuredOutputsParams()
    _refused("structured_outputs", response_format={"type": "json_object"}, structured_outputs={"regex": "a"})


def test_guided_fields_are_mapped():
    # vLLM 0.26 dropped guided_* (ignored as unknown fields, with a warning); meshserve still applies them
    assert _req(guided_regex="a+").regex == "a+"
    assert _req(guided_choice=["x"]).choice == ["x"]
    assert _req(guided_grammar="start: 'a'").grammar == "start: 'a'"
    assert json.loads(_req(guided_json={"type": "integer"}).json) == {"type": "integer"}


def test_whitespace_options_and_compact_json(compiler):
    # meshserve compiles JSON without free whitespace (vLLM's default allows it: its server flag
    # --structured-outputs-config.disable_any_whitespace turns it off; the per-request fields are ignored there)
    compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
    assert _full(compiled, '{"a": 1}') and not _full(compiled, '{\n"a": 1}')
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="hi", structured_outputs={"regex": "a", "whitespace_pattern": " *"})


def test_check_is_cached_per_spec():
    check_structured_outputs(StructuredOutputsParams(grammar="start: 'a'"))
    check_structured_outputs(StructuredOutputsParams(grammar="start: 'a'"))
