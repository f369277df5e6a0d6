"""--reasoning-parser end to end over HTTP, with a scripted model output (scripted_engine.py): message.reasoning
and message.content of whole responses; streamed delta.reasoning then delta.content that add up to the whole
response, one token per chunk so every tag boundary is crossed; tool calls read only from the content after
the reasoning; what a structured request asks of the engine; text mode for a tokenizer without the tags;
/v1/completions and servers without the flag unchanged."""

from __future__ import annotations

import json

import httpx
import pytest

from meshserve.serve.config import ServeConfig
from tests.reasoning_model import reasoning_tokenizer
from tests.serve.conftest import start_server
from tests.serve.reasoning.chat_stream import joined, stream_choices
from tests.serve.reasoning.scripted_engine import ScriptedLLM

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
SCHEMA = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def served(tiny_engine, tiny_model_dir):
    """(base urls by server, scripted engines by server): qwen3 with a tokenizer that has the tags as tokens
    (and Hermes tool calls, or Qwen3.5's XML ones), deepseek_r1 with the tiny model's own tokenizer (text mode), and no parser."""
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    setups = {"qwen3": (reasoning_tokenizer(), ServeConfig(served_model_names=["m"], reasoning_parser="qwen3",
                                                          enable_auto_tool_choice=True, tool_call_parser="hermes")),
              "coder": (reasoning_tokenizer(), ServeConfig(served_model_names=["m"], reasoning_parser="qwen3",
                                                           enable_auto_tool_choice=True,
                                                           tool_call_parser="qwen3_coder")),
              "text": (plain, ServeConfig(served_model_names=["m"], reasoning_parser="deepseek_r1")),
              "none": (reasoning_tokenizer(), ServeConfig(served_model_names=["m"]))}
    servers, engines = {}, {}
    for name, (tok, config) in setups.items():
        engines[name] = ScriptedLLM(tiny_engine, tok)
        servers[name] = start_server(engines[name], config)
    yield {k: s.base_url for k, s in servers.items()}, engines
    for s in servers.values():
        s.stop()


def _chat(url: str, **body):
    body = {"model": "m", "messages": [{"role": "user", "content": "Weather in Rome?"}], **body}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    return r


@pytest.mark.parametrize("output,reasoning,content", [
    ("<think>The user asks about Rome.</think>\n\nIt is sunny.", "The user asks about Rome.", "\n\nIt is sunny."),
    ("The user asks.</think>Sunny.", "The user asks.", "Sunny."),  # the template opened the span
    ("Still thinking about the weat", "Still thinking about the weat", None),  # cut short by max_tokens
])
def test_whole_and_streamed(served, output, reasoning, content):
    urls, engines = served
    engines["qwen3"].say(output)
    message = _chat(urls["qwen3"]).json()["choices"][0]["message"]
    assert (message.get("reasoning"), message["content"]) == (reasoning, content)
    for per_step in (1, 3):
        engines["qwen3"].say(output, per_step)
        choices = stream_choices(urls["qwen3"])
        assert (joined(choices, "reasoning"), joined(choices, "content")) == (reasoning, content)
        kinds = [k for c in choices for k in ("reasoning", "content") if c["delta"].get(k)]
        assert kinds == sorted(kinds, key=["reasoning", "content"].index)  # reasoning first, then content
        assert not any("think>" in (c["delta"].get("reasoning") or "") + (c["delta"].get("content") or "")
                       for c in choices)
        assert choices[-1]["finish_reason"] == "stop"


def test_thinking_disabled_is_content(served):
    urls, engines = served
    engines["qwen3"].say("It is sunny.")
    body = _chat(urls["qwen3"], chat_template_kwargs={"enable_thinking": False}).json()
    message = body["choices"][0]["message"]  # vLLM's shape: its unused fields null (test_response_shape_parity.py)
    assert {k: v for k, v in message.items() if v is not None} == {"role": "assistant", "content": "It is sunny."}
    choices = stream_choices(urls["qwen3"], chat_template_kwargs={"enable_thinking": False})
    assert (joined(choices, "reasoning"), joined(choices, "content")) == (None, "It is sunny.")


def test_include_reasoning_false_leaves_it_out(served):
    urls, engines = served
    engines["qwen3"].say("<think>Hmm.</think>Sunny.")
    message = _chat(urls["qwen3"], include_reasoning=False).json()["choices"][0]["message"]
    assert message["reasoning"] is None and message["content"] == "Sunny."
    choices = stream_choices(urls["qwen3"], include_reasoning=False)
    assert (joined(choices, "reasoning"), joined(choices, "content")) == (None, "Sunny.")


def test_tool_calls_only_after_the_reasoning(served):
    urls, engines = served
    thought = "I could write " + CALL + " but first check."
    engines["qwen3"].say("<think>" + thought + "</think>\n\n" + CALL)
    choice = _chat(urls["qwen3"], tools=[TOOL]).json()["choices"][0]
    assert choice["message"]["reasoning"] == thought
    assert choice["message"]["content"] is None and choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}

    choices = stream_choices(urls["qwen3"], tools=[TOOL])
    assert joined(choices, "reasoning") == thought
    assert not (joined(choices, "content") or "").strip()
    calls = [tc for c in choices for tc in c["delta"].get("tool_calls") or []]
    assert calls[0]["function"]["name"] == "get_weather"
    assert "".join(tc["function"].get("arguments") or "" for tc in calls) == '{"city": "Rome"}'
    assert choices[-1]["finish_reason"] == "tool_calls"

    engines["qwen3"].say("<think>" + thought + "</think>No call after all.")  # a call in the thought only
    choice = _chat(urls["qwen3"], tools=[TOOL]).json()["choices"][0]
    assert choice["message"].get("tool_calls") is None and choice["message"]["content"] == "No call after all."
    assert choice["finish_reason"] == "stop"


def test_xml_tool_call_inside_the_thought_ends_it(served):
    """Qwen3.5 may open its call before closing the thought: the call is the content, read by qwen3_coder."""
    urls, engines = served
    call = "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"
    engines["coder"].say("I will check.\n" + call)
    choice = _chat(urls["coder"], tools=[TOOL]).json()["choices"][0]
    assert choice["message"]["reasoning"] == "I will check.\n" and choice["finish_reason"] == "tool_calls"
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Rome"}'}]
    choices = stream_choices(urls["coder"], tools=[TOOL])
    assert joined(choices, "reasoning") == "I will check.\n"
    calls = [tc for c in choices for tc in c["delta"].get("tool_calls") or []]
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(tc["function"].get("arguments") or "" for tc in calls)) == {"city": "Rome"}


def test_structured_outputs_wait_for_the_end_of_reasoning(served):
    """The grammar is deferred to the end tag's token, unless the prompt closed the span already."""
    urls, engines = served
    eng = engines["qwen3"]
    end_id = eng.tokenizer.convert_tokens_to_ids("</think>")
    eng.say('<think>Rome.</think>{"city": "Rome"}')
    body = _chat(urls["qwen3"], response_format=SCHEMA).json()
    assert body["choices"][0]["message"]["content"] == '{"city": "Rome"}'
    assert eng.params[-1].structured_outputs.reasoning_end_token_id == end_id
    assert json.loads(eng.params[-1].structured_outputs.json) == SCHEMA["json_schema"]["schema"]
    _chat(urls["qwen3"], structured_outputs={"choice": ["a", "b"]})
    assert eng.params[-1].structured_outputs.reasoning_end_token_id == end_id
    _chat(urls["qwen3"], tools=[TOOL], tool_choice="required")  # a constraint of its own
    assert eng.params[-1].structured_outputs.reasoning_end_token_id == end_id
    _chat(urls["qwen3"], response_format=SCHEMA, chat_template_kwargs={"enable_thinking": False})
    assert eng.params[-1].structured_outputs.reasoning_end_token_id is None  # constrained from the first token
    _chat(urls["qwen3"])
    assert eng.params[-1].structured_outputs is None


def test_text_mode_for_a_tokenizer_without_the_tags(served):
    """The tiny model's tokenizer spells <think> with several tokens: the text decides, and one token per
    chunk cuts the tags everywhere."""
    urls, engines = served
    eng = engines["text"]
    assert len(eng.say("</think>")) > 1
    eng.say("Hmm, Rome.</think>Sunny.")
    message = _chat(urls["text"]).json()["choices"][0]["message"]
    assert (message["reasoning"], message["content"]) == ("Hmm, Rome.", "Sunny.")
    choices = stream_choices(urls["text"])
    assert (joined(choices, "reasoning"), joined(choices, "content")) == ("Hmm, Rome.", "Sunny.")
    r = _chat(urls["text"], response_format=SCHEMA)  # no end token to wait for: refused, not constrained early
    assert r.status_code == 400 and "single token" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "response_format"
    r = _chat(urls["text"], tools=[TOOL], tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_completions_and_servers_without_the_flag_are_unchanged(served):
    urls, engines = served
    engines["qwen3"].say("<think>Hmm.</think>Sunny.")
    r = httpx.post(urls["qwen3"] + "/v1/completions", json={"model": "m", "prompt": "Weather?"}, timeout=60)
    assert r.json()["choices"][0]["text"] == "<think>Hmm.</think>Sunny."  # chat only, as in vLLM
    engines["none"].say("<think>Hmm.</think>Sunny.")
    r = _chat(urls["none"])
    assert r.json()["choices"][0]["message"]["reasoning"] is None  # null, as vLLM sends it without a parser
    assert r.json()["choices"][0]["message"]["content"] == "<think>Hmm.</think>Sunny."
    choices = stream_choices(urls["none"])
    assert joined(choices, "content") == "<think>Hmm.</think>Sunny." and joined(choices, "reasoning") is None


def test_structured_answer_after_free_reasoning_end_to_end(tmp_path):
    """The real engine (its own process) behind the server: the tiny random model thinks noise, closes its
    thought (a logit bias makes </think> likely), then answers in the schema; with thinking disabled the
    answer is constrained from its first token."""
    pytest.importorskip("xgrammar")
    import jsonschema

    from tests.reasoning_model import make_reasoning_checkpoint
    from tests.serve.conftest import make_engine

    allm = make_engine(make_reasoning_checkpoint(str(tmp_path / "model")))
    srv = start_server(allm, ServeConfig(served_model_names=["m"], reasoning_parser="qwen3"))
    try:
        end = allm.tokenizer.convert_tokens_to_ids("</think>")
        schema = SCHEMA["json_schema"]["schema"] | {"properties": {"city": {"enum": ["Rome", "Paris"]}}}
        fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
        for kwargs in ({}, {"chat_template_kwargs": {"enable_thinking": False}}):
            r = _chat(srv.base_url, response_format=fmt, temperature=1.0, seed=5, max_tokens=120,
                      logit_bias={str(end): 4.0}, **kwargs)
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "stop", choice
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
            assert bool(choice["message"].get("reasoning")) is not bool(kwargs)
    finally:
        srv.stop()
        allm.shutdown()


def _responses_events(url: str, **body) -> list[dict]:
    """/v1/responses' stream, each event checked against the SDK's ResponseStreamEvent union."""
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    adapter = TypeAdapter(ResponseStreamEvent)
    events = []
    with httpx.stream("POST", url + "/v1/responses", json={"model": "m", "input": "Weather in Rome?",
                                                            "stream": True, **body}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                adapter.validate_python(events[-1])
    return events


@pytest.mark.parametrize("per_step", [1, 3])
def test_responses_carry_the_reasoning_as_its_own_item(served, per_step):
    """/v1/responses: the reasoning is a reasoning item before the message or the function call, whole and
    streamed (response.reasoning_text.delta events), and the SDK parses both; a reasoning item sent back as
    input is accepted."""
    from openai.types.responses import Response

    urls, engines = served
    thought = "The user asks about Rome."
    for answer, kinds in (("\n\nIt is sunny.", ["reasoning", "message"]), ("\n\n" + CALL, ["reasoning", "function_call"])):
        engines["qwen3"].say("<think>" + thought + "</think>" + answer, per_step)
        r = httpx.post(urls["qwen3"] + "/v1/responses", json={"model": "m", "input": "Weather in Rome?",
                                                               "tools": [{"type": "function", **TOOL["function"]}]},
                       timeout=60)
        whole = Response.model_validate(r.json())
        assert [item.type for item in whole.output] == kinds
        assert whole.output[0].content[0].text == thought
        if kinds[1] == "message":
            assert whole.output[1].content[0].text == answer
        else:
            assert whole.output[1].name == "get_weather" and json.loads(whole.output[1].arguments) == {"city": "Rome"}

        engines["qwen3"].say("<think>" + thought + "</think>" + answer, per_step)
        events = _responses_events(urls["qwen3"], tools=[{"type": "function", **TOOL["function"]}])
        assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == thought
        assert "think>" not in "".join(e.get("delta", "") for e in events if isinstance(e.get("delta"), str))
        last = events[-1]["response"]
        assert events[-1]["type"] == "response.completed" and [i["type"] for i in last["output"]] == kinds
        assert last["output"][0]["content"][0]["text"] == thought
        done = [e["item"]["type"] for e in events if e["type"] == "response.output_item.done"]
        assert done == kinds  # the reasoning item closed before the answer's opened

    engines["qwen3"].say("Sunny.", per_step)
    r = httpx.post(urls["qwen3"] + "/v1/responses", json={"model": "m", "input": [
        {"role": "user", "content": "Weather?"}, whole.output[0].model_dump(exclude_none=True),
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]}, timeout=60)
    assert r.status_code == 200, r.text


def test_named_tool_choice_waits_for_the_end_of_reasoning_when_streamed(served):
    """A named function's call is the content after the thought: streamed, it opened on the first delta (no
    content yet), so /v1/responses closed the reasoning item early and opened a second one, and an output that
    never left the thought streamed a call that the whole response has not (found by
    test_reasoning_differential.py, seed 1 case 21)."""
    urls, engines = served
    named = {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    engines["qwen3"].say("Still thinking about Rome", finish_reason="length")
    assert _chat(urls["qwen3"], **named).json()["choices"][0]["message"].get("tool_calls") is None
    engines["qwen3"].say("Still thinking about Rome", finish_reason="length")
    assert not any(c["delta"].get("tool_calls") for c in stream_choices(urls["qwen3"], **named))

    engines["qwen3"].say('<think>Rome, then.</think>{"city": "Rome"}')
    events = _responses_events(urls["qwen3"], tools=[{"type": "function", **TOOL["function"]}],
                               tool_choice={"type": "function", "name": "get_weather"})
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    assert added == ["reasoning", "function_call"]
    reasoning, call = events[-1]["response"]["output"]
    assert reasoning["content"][0]["text"] == "Rome, then." and call["arguments"] == '{"city": "Rome"}'
