"""Tool-call parsers read whole outputs as vLLM's do (malformed output stays content, never an error), and
while streaming report only final prefixes: streamed char by char, the deltas add up to the whole parse."""

from __future__ import annotations

import json

import pytest

from meshserve.serve.tool_call_stream import ToolCallStream
from meshserve.serve.tool_calls import ToolPlan
from meshserve.serve.tool_parsers import TOOL_PARSERS, get_tool_parser

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}}}}}


def _calls(parser, text):
    content, calls = parser.extract(text)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_extracts_calls_and_leading_content():
    p = get_tool_parser("hermes")
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    assert _calls(p, text) == ("Let me check.\n", [("get_weather", {"city": "Paris"}), ("get_time", {})])
    # arguments are the model's own text
    assert p.extract(text)[1][0].arguments == '{"city": "Paris"}'
    assert p.extract("no tools here") == ("no tools here", [])
    # a malformed call leaves the whole output as text
    for bad in ("<tool_call>{not json</tool_call>", '<tool_call>{"name": 3}</tool_call>',
                '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "<tool_call>get_weather()</tool_call>",
                '<tool_call>{"name": "f", "arguments": {"a": 1}} trailing</tool_call>',
                '<tool_call>{"name": "f", "arguments": {"a": 1'):  # the last: cut by max_tokens
        assert p.extract(bad) == (bad, []), bad
    # unterminated but complete JSON still counts; arguments sent as JSON text are decoded
    assert p.extract('<tool_call>{"name": "f", "arguments": {"x": 1}}')[1][0].arguments == '{"x": 1}'
    assert p.extract('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')[1][0].arguments == '{"x": 1}'


def test_hermes_streaming_holds_back_a_possible_marker_only():
    p = get_tool_parser("hermes")
    assert p.extract_partial("Hello").content_end == 5
    assert p.extract_partial("Hello <tool").content_end == len("Hello ")
    assert p.extract_partial("a < b").content_end == 5
    found = p.extract_partial('Hello <tool_call>{"name": "f", "arguments": {"a": "x')
    assert found.content_end == len("Hello ")
    assert [(c.name, c.arguments) for c in found.calls] == [("f", '{"a": "x')]
    assert p.extract_partial('<tool_call>{"name": "f').calls == []  # the name is not complete yet


def test_llama3_json_extracts_whole_message_calls():
    p = get_tool_parser("llama3_json")
    content, calls = _calls(p, '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}')
    assert content is None and calls == [("f", {"a": 1}), ("g", {})]
    assert p.extract("The answer is 4.") == ("The answer is 4.", [])
    assert p.extract('{"no_name": 1}') == ('{"no_name": 1}', [])
    assert p.extract('{"name": "f", "parameters": {}} and then prose') == (
        '{"name": "f", "parameters": {}} and then prose', [])
    assert p.extract_partial("  {").content_end == 0 and p.extract_partial("Sure").content_end == 4


def test_mistral_reads_both_formats_and_keeps_special_tokens():
    p = get_tool_parser("mistral")
    assert p.keeps_special_tokens
    old = 'Sure.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "g", "arguments": {}}]'
    assert _calls(p, old) == ("Sure.", [("get_weather", {"city": "Paris"}), ("g", {})])
    new = '[TOOL_CALLS]get_weather{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}'
    assert _calls(p, new) == (None, [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})])
    for bad in ("[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {}}", "[TOOL_CALLS]f{oops}", "[TOOL_CALLS]",
                "[TOOL_CALLS] [1, 2]", "[TOOL_CALLS]get_weather[1]"):
        assert p.extract(bad) == (bad, []), bad
    assert p.extract_partial("Hi [TOOL_C").content_end == 3


def test_pythonic_reads_keyword_literals():
    p = get_tool_parser("pythonic")
    text = '[get_weather(city="San Francisco", days=3, metric=True), get_time(tz=None, zones=["UTC", (1, 2)])]'
    assert _calls(p, text) == (None, [("get_weather", {"city": "San Francisco", "days": 3, "metric": True}),
                                      ("get_time", {"tz": None, "zones": ["UTC", [1, 2]]})])
    llama4 = '<|python_start|>[search(q="a, b)")]<|python_end|>'
    assert _calls(p, llama4) == (None, [("search", {"q": "a, b)"})])
    for bad in ("[f(1)]", "[f(x=y)]", "[f(x=1)", "[1, 2, 3] are numbers", "[f(**k)]", "[f(x={1, 2})]", "[]"):
        assert p.extract(bad) == (bad, []), bad
    assert p.extract_partial("Hello").content_end == 5 and p.extract_partial("[get_").content_end == 0
    found = p.extract_partial('[f(a=1), g(b="x')
    assert [(c.name, c.arguments) for c in found.calls] == [("f", '{"a": 1}'), ("g", "")]


def test_qwen3_coder_types_values_by_the_tool_schema():
    p = get_tool_parser("qwen3_coder", [WEATHER])
    text = ("I'll look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\n12 Rue\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=extra>\n"
            "{\"a\": [1]}\n</parameter>\n</function>\n</tool_call>")
    assert _calls(p, text) == ("I'll look.\n", [("get_weather", {"city": "12 Rue", "days": 3, "metric": True,
                                                                 "extra": {"a": [1]}})])
    assert _calls(p, "<tool_call>\n<function=f>\n</function>\n</tool_call>") == (None, [("f", {})])
    # cut short after the name: the call with the parameters completed so far, closed (as vLLM's); before it: text
    assert _calls(p, "<tool_call>\n<function=f>\n<parameter=a>\n1\n") == (None, [("f", {})])
    for bad in ("<tool_call>\n<function=f\n", "<tool_call>\n<function=f</tool_call>"):
        assert p.extract(bad) == (bad, []), bad


STREAMED = {  # realistic outputs of each format, streamed character by character below
    "hermes": [('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris, \\"FR\\"", '
                '"days": [1, {"x": "}"}]}}\n</tool_call>\n<tool_call>\n{"arguments": {}, "name": "g"}\n</tool_call>'),
               "<tool_call>{not json</tool_call>", "plain <b>text</b>"],
    "llama3_json": ['{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "g", "parameters": {}}',
                    "The sky is blue."],
    "mistral": ['[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]',
                '[TOOL_CALLS]get_weather{"city": "Rome"}[TOOL_CALLS]g[ARGS]{}', "[TOOL_CALLS]f{broken"],
    "pythonic": ['[get_weather(city="Lima", days=2), g()]', "[not a call"],
    "qwen3_coder": [("Ok.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nLima\n</parameter>\n"
                     "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>")],
}


def _stream(plan, text, step=1, pieces=None):
    s, content, calls = ToolCallStream(plan), "", {}
    for end in [*range(step, len(text), step), len(text)]:
        if end < len(text):
            delta_content, deltas = s.step(text[:end])
        else:
            delta_content, deltas, _ = s.finish(text)
        content += delta_content or ""
        for d in deltas:
            if d.index not in calls:  # the first delta of a call names it
                assert d.id.startswith("call_") and d.type == "function" and d.function.name
                calls[d.index] = [d.function.name, ""]
            else:
                assert d.id is None and d.function.name is None
            calls[d.index][1] += d.function.arguments or ""
            if pieces is not None:
                pieces[d.index] = pieces.get(d.index, 0) + 1
    return content, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("name", sorted(STREAMED))
def test_streamed_deltas_add_up_to_the_whole_parse(name):
    for text in STREAMED[name]:
        plan = ToolPlan("auto", [WEATHER], parser=get_tool_parser(name, [WEATHER]))
        content, calls = plan.extract(text)
        for step in (1, 3):
            got_content, got_calls = _stream(plan, text, step)
            if calls:  # well formed: exact agreement, arguments arrive in pieces
                assert got_content == (content or "")
                assert got_calls == [(c.function.name, c.function.arguments) for c in calls]
            else:  # not calls after all: every character still reaches the client, as content
                assert content == text and got_content == text


def test_json_arguments_stream_in_pieces():
    plan = ToolPlan("auto", [WEATHER], parser=get_tool_parser("hermes"))
    pieces = {}
    _stream(plan, STREAMED["hermes"][0], pieces=pieces)
    # get_weather's arguments arrive character by character; g's arguments are complete when its name is
    assert pieces[0] > 40 and pieces[1] == 1


def test_parallel_tool_calls_false_keeps_the_first_call():
    plan = ToolPlan("auto", [WEATHER], parser=get_tool_parser("pythonic"), parallel=False)
    text = "[f(a=1), g(b=2)]"
    assert [c.function.name for c in plan.extract(text)[1]] == ["f"]
    assert _stream(plan, text) == ("", [("f", '{"a": 1}')])


def test_every_registered_parser_survives_garbage():
    for name in TOOL_PARSERS:
        p = get_tool_parser(name, [WEATHER])
        for junk in ("", "{", "[", "<tool_call>", "[TOOL_CALLS]", '{"name": "f", "parameters": {"a": }}', "\\x00]"):
            content, calls = p.extract(junk)
            assert calls == [] and content == junk
            assert p.extract_partial(junk).content_end <= len(junk)


# Regressions from a differential check against vLLM 0.26's parsers (fixed inputs; vLLM is not needed here).

def _whole(name, text):
    plan = ToolPlan("auto", [WEATHER], parser=get_tool_parser(name, [WEATHER]))
    content, calls = plan.extract(text)
    return plan, content, [(c.function.name, c.function.arguments) for c in calls]


def _streams_as_whole(name, text):
    plan, content, calls = _whole(name, text)
    for step in (1, 2, 5):
        assert _stream(plan, text, step) == (content or "", calls), (text, step)
    return content, calls


def test_json_call_objects_must_be_json_as_a_whole():
    # an invalid member other than name/arguments (vLLM's json.loads refuses the object): not a finished call
    p = get_tool_parser("llama3_json")
    bad = '{"name": "f", "x": {"a"; 1}, "parameters": {}}'
    assert p.extract(bad) == (bad, [])
    for text in ('{"name": "f", "parameters": {"x": NaN}}', '<tool_call>{"name": "f", "arguments": {"x": Infinity}}'):
        parser = get_tool_parser("hermes" if text.startswith("<") else "llama3_json")
        assert parser.extract(text) == (text, []), text  # NaN and Infinity are not JSON


def test_a_repeated_key_is_malformed_and_the_stream_keeps_what_it_sent():
    # json.loads keeps the last "name"; the stream had sent the first, so the object counts as malformed after
    # its name: the first name and arguments, whole and streamed alike
    text = '<tool_call>{"name": "a", "arguments": {"x": 1}, "name": "b", "arguments": "{}"}</tool_call>'
    assert get_tool_parser("hermes").extract(text) == (text, [])
    assert _streams_as_whole("hermes", text) == (None, [("a", '{"x": 1}')])
    text = '[TOOL_CALLS] [{"name": "a", "arguments": {}, "name": "b"}]'
    assert _streams_as_whole("mistral", text) == (None, [("a", "{}")])


def test_a_finished_call_before_a_malformed_rest_keeps_its_whole_arguments():
    # missing arguments are {} and arguments sent as JSON text are decoded, also when what follows is malformed
    # (they used to come back as "")
    assert _streams_as_whole("mistral", '[TOOL_CALLS] [{"name": "f"}] trailing') == (None, [("f", "{}")])
    assert _streams_as_whole("hermes", '<tool_call>{"name": "f"} junk</tool_call>') == (None, [("f", "{}")])
    assert _streams_as_whole("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"} junk') == (
        None, [("f", '{"a": 1}')])
    # arguments that are JSON text in a string but not an object: the text as written, as vLLM returns it
    assert _streams_as_whole("hermes", '<tool_call>{"name": "f", "arguments": "{bad"}</tool_call>') == (
        None, [("f", "{bad")])


def test_llama3_json_calls_separated_by_commas():
    text = '{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}'
    assert _calls(get_tool_parser("llama3_json"), text) == (None, [("f", {"a": 1}), ("g", {})])
    assert _streams_as_whole("llama3_json", text) == (None, [("f", '{"a": 1}'), ("g", "{}")])


def test_pythonic_reads_json_literals_and_refuses_infinity():
    p = get_tool_parser("pythonic")
    assert _calls(p, "[f(a=true, b=null, c=[false, {'k': -1}])]") == (
        None, [("f", {"a": True, "b": None, "c": [False, {"k": -1}]})])
    assert p.extract("[f(a=1e999)]") == ("[f(a=1e999)]", [])  # json.dumps would write Infinity, not JSON
    # <|python_end|> inside a string is text; after the list it ends the message
    assert _calls(p, '[f(a="<|python_end|>")]') == (None, [("f", {"a": "<|python_end|>"})])
    assert _calls(p, "<|python_start|>[f()]<|python_end|>\n") == (None, [("f", {})])
    assert _streams_as_whole("pythonic", '[f(a=true), g(b="<|python_end|>")]<|python_end|>') == (
        None, [("f", '{"a": true}'), ("g", '{"b": "<|python_end|>"}')])


def test_qwen3_coder_cut_short_and_lenient_parameters():
    tools = [WEATHER]
    p = get_tool_parser("qwen3_coder", tools)
    call = "<tool_call>\n<function=get_weather>\n"
    # cut short: the parameters complete so far, closed into an object (it was left open: "{" or '{"city": "x"')
    assert _streams_as_whole("qwen3_coder", call + "<parameter=city>\nx\n</parameter>\n<parameter=days>\n1") == (
        None, [("get_weather", '{"city": "x"}')])
    assert _streams_as_whole("qwen3_coder", "Hi " + call) == ("Hi ", [("get_weather", "{}")])
    # a parameter without its end tag ends where the next begins; text between parameters is skipped; one left
    # open at </function> is dropped (as vLLM reads them)
    text = (call + "<parameter=city>\nx\n<parameter=days>\n2\n</parameter>\nstray\n<parameter=metric>\ntrue\n"
            "</function>\n</tool_call>")
    assert _calls(p, text) == (None, [("get_weather", {"city": "x", "days": 2})])
    assert _streams_as_whole("qwen3_coder", text) == (None, [("get_weather", '{"city": "x", "days": 2}')])
    # NaN or infinity is not JSON: the value stays text
    text = call + "<parameter=days>\nNaN\n</parameter>\n<parameter=extra>\n1e999\n</parameter>\n</function>"
    assert _calls(p, text) == (None, [("get_weather", {"days": "NaN", "extra": "1e999"})])
    # a function name with "<" in it, or blank, is no function head
    for bad in ("<function=f</tool_call>", "<function= >\n</function>"):
        assert p.extract(bad) == (bad, []), bad


# outputs whose scans the stream's memo resumes mid-way: escapes and backslash runs cut at every step size, nested
# containers, strings holding brackets, a parameter of qwen3_coder's ending by the next one's tag
RESUMED = {
    "hermes": ['<tool_call>{"name": "w", "arguments": {"code": "a = \\"}\\\\\\\\\\" + \'[\'\\n", "n": [[1, {"b": "\\\\"}], 2.5e3],'
               ' "t": true}}</tool_call><tool_call>{"name": "g", "arguments": "{\\"k\\": [1]}"}</tool_call>'],
    "llama3_json": ['{"name": "w", "parameters": {"s": "\\\\\\"x\\\\", "o": {"p": ["]", "}"]}}}'],
    "mistral": ['[TOOL_CALLS] [{"name": "w", "arguments": {"s": "q\\"\\\\", "l": [{}, []]}}, {"name": "g", '
                '"arguments": {}}]'],
    "qwen3_coder": ["<tool_call>\n<function=get_weather>\n<parameter=city>\nA </parameter> B\n</parameter>\n"
                    "<parameter=days>\n4\n<parameter=metric>\ntrue\n</parameter>\n</function>\n</tool_call>"],
    "pythonic": ["""[w(code='a(\\'[\\' + "}"', n=[1, (2, {"k": ")"})]), g()]""",
                 "[w(a=[1)], g()]"],  # the second malformed: a bracket closing the wrong one
}


def _step_outputs(plan, text, step):
    s, out = ToolCallStream(plan), []
    for end in range(step, len(text), step):
        content, deltas = s.step(text[:end])
        out.append((content, [(d.index, d.function.name, d.function.arguments) for d in deltas]))
    content, deltas, has_calls = s.finish(text)
    return out + [(content, [(d.index, d.function.name, d.function.arguments) for d in deltas], has_calls)]


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_resumed_scans_stream_what_fresh_scans_do(name, monkeypatch):
    """The stream's scans resume where the last step's stopped (GrowingText's memo): every step must send
    what scanning the whole text afresh sends, at every step size."""
    from meshserve.serve.tool_parsers import json_spans

    real = json_spans.GrowingText.extending
    plan = ToolPlan("auto", [WEATHER], parser=get_tool_parser(name, [WEATHER]))
    assert plan.extract(RESUMED[name][0])[1]  # the first sample of each is well formed
    for text in RESUMED[name]:
        for step in (1, 2, 3, 7):
            resumed = _step_outputs(plan, text, step)
            with monkeypatch.context() as m:  # each step's text with a memo of its own: scanned afresh
                m.setattr(json_spans.GrowingText, "extending",
                          classmethod(lambda cls, text, before: real(text, None)))
                fresh = _step_outputs(plan, text, step)
            assert resumed == fresh, (name, step)


def test_a_text_that_does_not_extend_the_last_gets_a_fresh_memo():
    from meshserve.serve.tool_parsers.json_spans import GrowingText, value_end

    first = GrowingText.extending('{"a": "xy', None)
    assert value_end(first, 0) is None
    other = GrowingText.extending('{"a": "x"}', first)  # rewritten, not grown: the memo must not carry over
    assert other.memo is not first.memo and value_end(other, 0) == 10
    grown = GrowingText.extending('{"a": "xy"} ', first)
    assert grown.memo is first.memo and value_end(grown, 0) == 11


def test_streamed_pieces_are_plain_strings():
    """A named function's arguments are the whole output: the delta must not carry the stream's GrowingText
    (msgspec, which encodes stream chunks, refuses str subclasses)."""
    msgspec = pytest.importorskip("msgspec")
    plan = ToolPlan("named", [WEATHER], parser=get_tool_parser("hermes", [WEATHER]))
    from meshserve.serve.tool_calls import _NamedToolParser

    plan.parser = _NamedToolParser("get_weather")
    s = ToolCallStream(plan)
    deltas = s.step('{"city": "Rome"')[1] + s.finish('{"city": "Rome"}')[1]
    for d in deltas:
        assert type(d.function.arguments) is str
        msgspec.json.encode(d.function.arguments)


def test_a_long_streamed_call_costs_linear_time(monkeypatch):
    """A tool call writing a file streams thousands of steps; each must read only what is new: counted as
    the str.find calls of the scans (each jumps to the next quote), not timed. Scanned afresh, every step
    would find every escaped quote written so far (~1,600 at the end here)."""
    from meshserve.serve.tool_parsers import json_spans

    code = 'print("a \\"quoted\\" word")\n' * 400
    text = "<tool_call>" + json.dumps({"name": "w", "arguments": {"code": code}}) + "</tool_call>"
    plan = ToolPlan("auto", [WEATHER], parser=get_tool_parser("hermes", [WEATHER]))
    finds = 0

    def counted(self, *args):
        nonlocal finds
        finds += 1
        return str.find(self, *args)

    monkeypatch.setattr(json_spans.GrowingText, "find", counted, raising=False)
    s, steps, arguments = ToolCallStream(plan), 0, ""
    for end in range(5, len(text), 5):
        arguments += "".join(d.function.arguments or "" for d in s.step(text[:end])[1])
        steps += 1
    arguments += "".join(d.function.arguments or "" for d in s.finish(text)[1])
    assert json.loads(arguments) == {"code": code}
    assert steps <= finds < 12 * steps  # at least the open string's one find a step: the scans did run on it
