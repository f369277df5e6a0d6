"""POST /v1/responses through the official `openai` client against a live server on the tiny random model:
the same greedy text as /v1/chat/completions, items and instructions, the length limit, the event stream
(parsed by the SDK and checked against its types), function calls both ways, text.format json_schema,
and 400s in OpenAI's error shape."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from pydantic import TypeAdapter

from meshserve.serve.config import ServeConfig
from tests.serve.conftest import start_server

openai = pytest.importorskip("openai")
from openai.types.responses import Response, ResponseStreamEvent  # noqa: E402

MODEL = "m"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"},
               "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}
STREAM_EVENT = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def server(tiny_engine):
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL]))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


def _text(resp) -> str:
    (item,) = [o for o in resp.output if o.type == "message"]
    return "".join(part.text for part in item.content)


def test_greedy_text_equals_chat_completions(client, http):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    resp = client.responses.create(model=MODEL, instructions="Be brief.", input="Hello there",
                                   max_output_tokens=12, temperature=0)
    assert _text(resp) == chat.choices[0].message.content
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == MODEL
    (msg,) = resp.output
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.content[0].type == "output_text" and msg.content[0].annotations == []
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    assert resp.usage.output_tokens_details.reasoning_tokens == 0
    finish = chat.choices[0].finish_reason
    assert resp.status == ("incomplete" if finish == "length" else "completed")
    # the echoed settings, and a body the SDK's own types validate (not only construct)
    assert (resp.instructions, resp.max_output_tokens, resp.temperature) == ("Be brief.", 12, 0.0)
    assert resp.tools == [] and resp.tool_choice == "auto" and resp.parallel_tool_calls is True
    assert resp.text.format.type == "text"
    raw = http.post("/v1/responses", json={"model": MODEL, "input": "Hello there", "max_output_tokens": 12,
                                           "temperature": 0, "instructions": "Be brief."}).json()
    Response.model_validate(raw)


def test_item_list_input_with_instructions_equals_chat(client):
    history = [{"role": "user", "content": "Hi"},
               {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]},
               {"role": "user", "content": [{"type": "input_text", "text": "Count to three"}]}]
    resp = client.responses.create(model=MODEL, input=history, instructions="You count.",
                                   max_output_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(model=MODEL, max_tokens=10, temperature=0, extra_body={"ignore_eos": True},
                                          messages=[{"role": "system", "content": "You count."},
                                                    {"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hello!"},
                                                    {"role": "user", "content": "Count to three"}])
    assert _text(resp) == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens


def test_max_output_tokens_makes_it_incomplete(client):
    resp = client.responses.create(model=MODEL, input="Tell me a story", max_output_tokens=3, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output[0].status == "incomplete" and resp.usage.output_tokens == 3


def test_function_call_round_trip(client):
    """tool_choice "required" makes the model call the tool (its grammar forces the call); the call goes
    back as history with its output, and the model's next answer is the one chat gives for that history."""
    resp = client.responses.create(model=MODEL, input="Weather in Rome?", tools=[WEATHER], tool_choice="required",
                                   parallel_tool_calls=False, max_output_tokens=200, temperature=0)
    (call,) = resp.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert resp.status == "completed" and resp.tool_choice == "required" and resp.parallel_tool_calls is False
    assert resp.tools[0].name == "get_weather" and resp.tools[0].parameters == WEATHER["parameters"]

    history = [{"role": "user", "content": "Weather in Rome?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}]
    answer = client.responses.create(model=MODEL, input=history, tools=[WEATHER], tool_choice="none",
                                     max_output_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0, tool_choice="none", extra_body={"ignore_eos": True},
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
        messages=[{"role": "user", "content": "Weather in Rome?"},
                  {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function", "function": {
                      "name": call.name, "arguments": call.arguments}}]},
                  {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 21}'}])
    assert [o.type for o in answer.output] == ["message"]
    assert _text(answer) == chat.choices[0].message.content
    assert answer.usage.input_tokens == chat.usage.prompt_tokens


def test_named_tool_choice(client):
    resp = client.responses.create(model=MODEL, input="Weather?", tools=[WEATHER], max_output_tokens=200,
                                   tool_choice={"type": "function", "name": "get_weather"}, temperature=0)
    (call,) = resp.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert resp.tool_choice.type == "function" and resp.tool_choice.name == "get_weather"


def test_text_format_json_schema_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    resp = client.responses.create(model=MODEL, input="A person as JSON", max_output_tokens=200, temperature=0,
                                   text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                    "strict": True}})
    jsonschema.validate(json.loads(_text(resp)), schema)
    assert resp.text.format.type == "json_schema" and resp.text.format.name == "person"
    assert resp.status == "completed"
    obj = client.responses.create(model=MODEL, input="Any JSON", max_output_tokens=200, temperature=0,
                                  text={"format": {"type": "json_object"}})
    if obj.status == "completed":
        assert isinstance(json.loads(_text(obj)), dict)
    else:  # a random model may write one long object: cut by the limit, still an object's prefix
        assert _text(obj).startswith("{") and obj.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("body, param, words", [
    ({"tools": [{"type": "web_search"}]}, "tools", "'web_search' are not supported"),
    ({"previous_response_id": "resp_123"}, "previous_response_id", "does not store responses"),
    ({"input": [{"type": "image_generation_call", "id": "x"}]}, "input", "'image_generation_call' are not"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "input",
     "input_image are not supported"),
    ({"input": [{"role": "critic", "content": "x"}]}, "input", "role"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input", "call_id"),
    ({"input": []}, "input", "must not be an empty list"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice", "not supported"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}], "tool_choice": "required"},
     "tools[0].parameters", "type object"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "bogus"}}}}, "text.format",
     "schema"),
    ({"tools": [WEATHER]}, "tool_choice", "--enable-auto-tool-choice"),  # "auto" needs a parser, as in chat
    ({"max_output_tokens": 100000}, "max_output_tokens", "max_model_len"),
    ({"model": "other"}, "model", "`other` does not exist"),
])
def test_bad_input_is_a_400_in_openais_shape(http, body, param, words):
    r = http.post("/v1/responses", json={"model": MODEL, "input": "hi", **body})
    assert r.status_code == (404 if "model" in body else 400), r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error


def test_bad_input_raises_in_the_client(client):
    with pytest.raises(openai.BadRequestError, match="does not store responses"):
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_1")
