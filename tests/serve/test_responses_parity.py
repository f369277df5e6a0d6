"""What /v1/responses returns, field by field against vLLM 0.26 (entrypoints/openai/responses: protocol.py
ResponsesResponse.from_request, serving.py responses_full_generator, streaming_events.py) and OpenAI's shape
(the SDK validates every body and event here): the request's settings echoed on the response object (reasoning,
service_tier, max_tool_calls, prompt, vLLM's penalties), usage with vLLM's detail fields, reasoning_tokens counted
with --reasoning-parser, id prefixes, and function_call_arguments.done carrying the function's name."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import TypeAdapter

from meshserve.serve.config import ServeConfig
from tests.serve.conftest import start_server

openai = pytest.importorskip("openai")
from openai.types.responses import Response, ResponseStreamEvent

MODEL = "m"
STREAM_EVENT = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"}},
    "required": ["city"]}}


@pytest.fixture(scope="module")
def http(tiny_engine):
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL]))
    with httpx.Client(base_url=srv.base_url, timeout=120) as c:
        yield c
    srv.stop()


def _events(http: httpx.Client, body: dict) -> list[dict]:
    out = []
    with http.stream("POST", "/v1/responses", json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                STREAM_EVENT.validate_json(line.removeprefix("data: "))
                out.append(json.loads(line.removeprefix("data: ")))
    return out


def test_settings_are_echoed_as_vllm_and_openai_echo_them(http):
    body = {"input": "Hi", "max_output_tokens": 5, "temperature": 0.5, "top_p": 0.9, "ignore_eos": True,
            "reasoning": {"effort": "low"}, "service_tier": "flex", "max_tool_calls": 3,
            "presence_penalty": 0.25, "frequency_penalty": -0.5, "tools": [WEATHER], "tool_choice": "none"}
    r = http.post("/v1/responses", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    got = r.json()
    Response.model_validate(got)
    assert got["reasoning"] == {"effort": "low"} and got["service_tier"] == "flex" and got["max_tool_calls"] == 3
    assert got["prompt"] is None and got["kv_transfer_params"] is None and got["background"] is False
    assert (got["presence_penalty"], got["frequency_penalty"]) == (0.25, -0.5)
    assert (got["temperature"], got["top_p"], got["max_output_tokens"]) == (0.5, 0.9, 5)
    assert got["tool_choice"] == "none" and [t["name"] for t in got["tools"]] == ["get_weather"]
    assert got["id"].startswith("resp_") and isinstance(got["created_at"], int) and got["model"] == MODEL
    assert got["status"] == "incomplete" and got["incomplete_details"] == {"reason": "max_output_tokens"}
    # the stream's first response carries the same settings, without output or usage
    created = _events(http, body)[0]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    for key in ("reasoning", "service_tier", "max_tool_calls", "presence_penalty", "frequency_penalty",
                "temperature", "top_p", "max_output_tokens", "tool_choice", "tools"):
        assert created[key] == got[key], key


def test_defaults_when_not_sent(http):
    got = http.post("/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 2}).json()
    Response.model_validate(got)
    assert got["reasoning"] is None and got["service_tier"] == "auto" and got["max_tool_calls"] is None
    assert (got["presence_penalty"], got["frequency_penalty"]) == (0.0, 0.0)  # vLLM's: the sampling params'


def test_usage_carries_vllms_detail_fields(http):
    got = http.post("/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 3,
                                           "ignore_eos": True}).json()
    usage = got["usage"]
    assert usage["input_tokens_details"] == {"cached_tokens": usage["input_tokens_details"]["cached_tokens"],
                                             "cache_write_tokens": 0, "input_tokens_per_turn": [],
                                             "cached_tokens_per_turn": []}
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                              "output_tokens_per_turn": [], "tool_output_tokens_per_turn": []}
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] and usage["output_tokens"] == 3
    (message,) = got["output"]
    assert message["id"].startswith("msg_") and message["status"] == "incomplete"
    assert message["content"][0] == {"type": "output_text", "text": message["content"][0]["text"],
                                     "annotations": [], "logprobs": []}
    assert Response.model_validate(got).output_text == message["content"][0]["text"]  # the SDK's convenience


def test_function_call_items_and_arguments_done_carry_the_name(http):
    body = {"input": "Weather in Rome?", "tools": [WEATHER], "tool_choice": "required", "temperature": 0,
            "parallel_tool_calls": False, "max_output_tokens": 100}
    events = _events(http, body)
    (done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done["name"] == "get_weather"  # vLLM's and OpenAI's API reference's; the SDK keeps it as an extra
    (call,) = events[-1]["response"]["output"]
    assert call["type"] == "function_call" and call["id"].startswith("fc_") and call["status"] == "completed"
    assert call["id"] == done["item_id"] and call["arguments"] == done["arguments"] and call["call_id"]


@pytest.fixture(scope="module")
def reasoning_server(tiny_engine):
    from tests.reasoning_model import reasoning_tokenizer
    from tests.serve.reasoning.scripted_engine import scripted_server

    with scripted_server(tiny_engine, reasoning_tokenizer(),
                         ServeConfig(served_model_names=[MODEL], reasoning_parser="qwen3")) as served:
        yield served


@pytest.mark.parametrize("script,thought", [
    ("<think>The user asks about Rome.</think>It is sunny.", "The user asks about Rome."),
    ("The user asks.</think>Sunny.", "The user asks."),  # the template opened the span
    ("Still thinking about the weat", "Still thinking about the weat"),  # never closed
])
def test_reasoning_item_and_reasoning_tokens(reasoning_server, script, thought):
    """vLLM's reasoning item: the text as reasoning_text content, summary [], id rs_; usage counts the tokens
    inside the span (vLLM's count_reasoning_tokens; here also when the template opened the span)."""
    url, engine = reasoning_server
    tok = engine.tokenizer
    expected = len(tok(thought, add_special_tokens=False).input_ids)
    engine.say(script)
    r = httpx.post(url + "/v1/responses", json={"model": MODEL, "input": "Weather?"}, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    Response.model_validate(got)
    reasoning = got["output"][0]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_") and reasoning["summary"] == []
    assert reasoning["content"] == [{"type": "reasoning_text", "text": thought}]
    assert got["usage"]["output_tokens_details"]["reasoning_tokens"] == expected
    assert got["usage"]["output_tokens"] == len(engine.script)

    engine.say(script)
    with httpx.stream("POST", url + "/v1/responses", json={"model": MODEL, "input": "Weather?", "stream": True},
                      timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    for e in events:
        STREAM_EVENT.validate_python(e)
    kinds = [e["type"] for e in events]
    # OpenAI's event names (vLLM 0.26 names the part events response.reasoning_part.added/.done instead)
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added",
                          "response.reasoning_text.delta"]
    assert events[3]["part"] == {"type": "reasoning_text", "text": ""}
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == thought
    assert events[-1]["response"]["usage"] == got["usage"]


def test_reasoning_tokens_are_counted_when_the_reasoning_is_not_returned(reasoning_server):
    url, engine = reasoning_server
    engine.say("<think>Hidden thought.</think>Sunny.")
    got = httpx.post(url + "/v1/responses", json={"model": MODEL, "input": "Weather?", "include_reasoning": False},
                     timeout=60).json()
    assert [o["type"] for o in got["output"]] == ["message"]
    assert got["usage"]["output_tokens_details"]["reasoning_tokens"] == len(
        engine.tokenizer("Hidden thought.", add_special_tokens=False).input_ids)
