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
from openai.types.responses import Response, ResponseStreamEvent

MODEL = "m"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"},
               "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}
STREAM_EVENT = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def request_log(tmp_path_factory):
    return tmp_path_factory.mktemp("responses") / "requests.jsonl"


@pytest.fixture(scope="module")
def server(tiny_engine, request_log):
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL], request_log=str(request_log)))
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
    # found by tests/serve/test_responses_differential.py's malformed bodies: a 500, and 400s naming no field
    # (or the stored-prompt parameter for a conversation too long)
    ({"tools": 0.5}, "tools", "valid list"),
    ({"stop": [""]}, "stop", "non-empty"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input", "at least 1 item"),
    ({"input": "Hello world, " * 200}, "input", "max_model_len"),
    # an unknown include value (OpenAI's 400) was accepted
    ({"include": ["message.output_text.bogus"]}, "include.0", "Input should be"),
])
def test_bad_input_is_a_400_in_openais_shape(http, body, param, words):
    r = http.post("/v1/responses", json={"model": MODEL, "input": "hi", **body})
    assert r.status_code == (404 if "model" in body else 400), r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error


def test_bad_input_raises_in_the_client(client):
    with pytest.raises(openai.BadRequestError, match="does not store responses") as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_1")
    # OpenAI's code, which clients (Codex) read to resend the whole conversation: it was "invalid_value"
    assert e.value.code == "previous_response_not_found"


def test_include_of_what_adds_nothing_is_accepted(client):
    resp = client.responses.create(model=MODEL, input="hi", max_output_tokens=2, temperature=0,
                                   include=["reasoning.encrypted_content", "file_search_call.results"])
    assert resp.output[0].type == "message"


def test_without_a_store_delete_and_cancel_are_404s_in_openais_shape(client, http):
    for method, path in (("DELETE", "/v1/responses/resp_1"), ("POST", "/v1/responses/resp_1/cancel")):
        r = http.request(method, path)
        assert r.status_code == 404 and r.json()["error"]["param"] == "response_id", r.text  # was a 405 / bare 404
    with pytest.raises(openai.NotFoundError, match="resp_1"):
        client.responses.delete("resp_1")


# -- streaming --------------------------------------------------------------------------------------
def _raw_events(http, body: dict) -> list:
    """The stream's events, each validated against the SDK's ResponseStreamEvent union (not only
    constructed), its `event:` line equal to its type."""
    events = []
    with http.stream("POST", "/v1/responses", json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                event = STREAM_EVENT.validate_json(line.removeprefix("data: "))
                assert event.type == kind
                events.append(event)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def _runs(kinds: list[str]) -> list[str]:
    return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]


def test_stream_events_and_deltas_equal_the_whole_response(client, http):
    body = {"input": "Count to three", "max_output_tokens": 15, "temperature": 0, "instructions": "Count."}
    whole = client.responses.create(model=MODEL, **body)
    events = _raw_events(http, body)
    kinds = [e.type for e in events]
    n = kinds.count("response.output_text.delta")
    assert n >= 1 and kinds == ["response.created", "response.in_progress", "response.output_item.added",
                                "response.content_part.added", *["response.output_text.delta"] * n,
                                "response.output_text.done", "response.content_part.done",
                                "response.output_item.done", f"response.{whole.status}"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == _text(whole) == events[-4].text
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in events if hasattr(e, "item_id"))
    final = events[-1].response
    assert _text(final) == deltas and final.output[0].id == item_id and final.id == events[0].response.id
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    # through the SDK: the plain iterator, and the stream helper that accumulates the events
    parsed = list(client.responses.create(model=MODEL, stream=True, **body))  # deltas may merge differently
    assert _runs([e.type for e in parsed]) == _runs(kinds)
    assert "".join(e.delta for e in parsed if e.type == "response.output_text.delta") == deltas
    with client.responses.stream(model=MODEL, **body) as stream:  # its snapshot: the text accumulated so far
        snapshots = [e.snapshot for e in stream if e.type == "response.output_text.delta"]
    assert snapshots[-1] == _text(whole)


def test_stream_incomplete_at_the_limit(http):
    events = _raw_events(http, {"input": "Tell me a story", "max_output_tokens": 4, "temperature": 0,
                                "ignore_eos": True})
    final = events[-1]
    assert final.type == "response.incomplete" and final.response.incomplete_details.reason == "max_output_tokens"
    assert final.response.usage.output_tokens == 4 and final.response.output[0].status == "incomplete"


def test_streamed_function_call_equals_the_whole_one(client, http):
    body = {"input": "Weather in Rome?", "tools": [WEATHER], "tool_choice": "required", "temperature": 0,
            "parallel_tool_calls": False, "max_output_tokens": 200}
    (whole,) = client.responses.create(model=MODEL, **body).output
    events = _raw_events(http, body)
    kinds = [e.type for e in events]
    n = kinds.count("response.function_call_arguments.delta")
    assert n >= 1 and kinds == ["response.created", "response.in_progress", "response.output_item.added",
                                *["response.function_call_arguments.delta"] * n,
                                "response.function_call_arguments.done", "response.output_item.done",
                                "response.completed"]
    added, done, final = events[2].item, events[-2].item, events[-1].response
    assert added.type == "function_call" and added.arguments == "" and added.name == "get_weather"
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == events[-3].arguments == done.arguments == whole.arguments
    assert done.status == "completed" and final.output == [done] and done.call_id == added.call_id
    with client.responses.stream(model=MODEL, **body) as stream:
        (call,) = stream.get_final_response().output
    assert call.type == "function_call" and call.arguments == whole.arguments


def test_engine_error_mid_stream_ends_with_response_failed(http, monkeypatch):
    from meshserve.serve.engine_client import EngineRequest

    async def broken(self):
        yield self.first
        raise RuntimeError("the engine broke")

    monkeypatch.setattr(EngineRequest, "__aiter__", broken)
    events = _raw_events(http, {"input": "Hello", "max_output_tokens": 20, "temperature": 0, "ignore_eos": True})
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2].code == "internal_error" and events[-2].message == "internal server error"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error"


def _requests_total(http) -> dict[str, float]:
    counts = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("meshserve:requests_total{"):
            counts[line.split('outcome="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return counts


def test_metrics_and_request_log_count_responses_as_chat_does(client, http, request_log):
    before, lines = _requests_total(http), len(request_log.read_text().splitlines())
    whole = client.responses.create(model=MODEL, input="Hi", max_output_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    streamed = list(client.responses.create(model=MODEL, input="Hi", max_output_tokens=6, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))[-1].response
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="Hi", tools=[{"type": "function", "name": "f"}],
                                tool_choice={"type": "function", "name": "g"})
    after = _requests_total(http)
    assert after["length"] - before.get("length", 0) == 2
    assert after["invalid"] - before.get("invalid", 0) == 1
    rows = [json.loads(line) for line in request_log.read_text().splitlines()[lines:]]
    assert [(r["prompt_tokens"], r["output_tokens"], r["outcome"]) for r in rows] == [
        (whole.usage.input_tokens, 5, "length"), (streamed.usage.input_tokens, 6, "length")]


# -- logprobs (include message.output_text.logprobs, top_logprobs) -----------------------------------------------
def test_logprobs_on_output_text_equal_chat_completions(client, http):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
                                          max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    raw = http.post("/v1/responses", json={"model": MODEL, "input": "Hello there", "max_output_tokens": 8,
                                           "temperature": 0, "top_logprobs": 3,
                                           "include": ["message.output_text.logprobs"]})
    assert raw.status_code == 200, raw.text
    resp = Response.model_validate(raw.json())  # the SDK's own types: Logprob and LogprobTopLogprob
    assert resp.top_logprobs == 3
    (part,) = resp.output[0].content
    assert part.logprobs and all(len(lp.top_logprobs) == 3 for lp in part.logprobs)
    assert "".join(lp.token for lp in part.logprobs) == part.text == chat.choices[0].message.content
    expected = chat.choices[0].logprobs.content
    assert [(lp.token, lp.bytes) for lp in part.logprobs] == [(e.token, e.bytes) for e in expected]
    # the same values (to float noise: a prefix-cache hit computes the prompt in other chunks)
    assert [lp.logprob for lp in part.logprobs] == pytest.approx([e.logprob for e in expected], abs=1e-4)
    assert [[t.token for t in lp.top_logprobs] for lp in part.logprobs] == [
        [t.token for t in e.top_logprobs] for e in expected]
    assert [t.logprob for lp in part.logprobs for t in lp.top_logprobs] == pytest.approx(
        [t.logprob for e in expected for t in e.top_logprobs], abs=1e-4)
    # include alone: logprobs without alternatives; top_logprobs alone asks for them too
    only = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=8, temperature=0,
                                   include=["message.output_text.logprobs"])
    assert [lp.token for lp in only.output[0].content[0].logprobs] == [e.token for e in expected]
    assert all(lp.top_logprobs == [] for lp in only.output[0].content[0].logprobs)
    top = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=8, temperature=0,
                                  top_logprobs=2)
    assert all(len(lp.top_logprobs) == 2 for lp in top.output[0].content[0].logprobs)


def test_streamed_logprobs_carry_each_deltas_tokens(client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
                                          max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    expected = [e.token for e in chat.choices[0].logprobs.content]
    values = pytest.approx([e.logprob for e in chat.choices[0].logprobs.content], abs=1e-4)
    events = list(client.responses.create(model=MODEL, input="Hello there", max_output_tokens=8, temperature=0,
                                          top_logprobs=2, include=["message.output_text.logprobs"], stream=True))
    for e in events:
        STREAM_EVENT.validate_python(e.model_dump())
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and all(e.logprobs for e in deltas)
    for e in deltas:  # each delta's tokens spell its text
        assert "".join(lp.token for lp in e.logprobs) == e.delta
        assert all(len(lp.top_logprobs) == 2 for lp in e.logprobs)
    assert [lp.token for e in deltas for lp in e.logprobs] == expected
    assert [lp.logprob for e in deltas for lp in e.logprobs] == values
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert [lp.token for lp in done.logprobs] == expected and [lp.logprob for lp in done.logprobs] == values
    final = events[-1].response.output[0].content[0]
    assert [lp.token for lp in final.logprobs] == expected and final.text == done.text


def test_logprobs_only_when_asked(client, http):
    """Without include's logprobs or top_logprobs > 0: `logprobs: []` on each part and text event, as OpenAI's."""
    asked = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=4, temperature=0,
                                    include=["message.output_text.logprobs"])
    assert asked.output[0].content[0].logprobs
    resp = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=4, temperature=0,
                                   top_logprobs=0)
    assert resp.output[0].content[0].text == asked.output[0].content[0].text
    assert resp.output[0].content[0].logprobs == []
    body = http.post("/v1/responses", json={"model": MODEL, "input": "Hello there", "max_output_tokens": 4,
                                            "temperature": 0}).json()
    assert body["output"][0]["content"][0]["logprobs"] == [] and body["top_logprobs"] is None
    events = list(client.responses.create(model=MODEL, input="Hello there", max_output_tokens=4, temperature=0,
                                          stream=True))
    assert all(e.logprobs == [] for e in events if e.type in ("response.output_text.delta",
                                                              "response.output_text.done"))


def test_top_logprobs_range_is_0_to_20(client, http):
    resp = client.responses.create(model=MODEL, input="hi", max_output_tokens=2, temperature=0, top_logprobs=20)
    assert all(len(lp.top_logprobs) == 20 for lp in resp.output[0].content[0].logprobs)
    for top, words in ((-1, "greater than or equal to 0"), (21, "less than or equal to 20")):
        r = http.post("/v1/responses", json={"model": MODEL, "input": "hi", "top_logprobs": top})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "top_logprobs" and words in error["message"], error
