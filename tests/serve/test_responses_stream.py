"""ResponseEvents on its own: text, then tool calls, then the end, as the events the SDK's types validate and
its stream accumulator (`client.responses.stream`) rebuilds into the response the last event carries."""

from __future__ import annotations

import json

import pytest
from pydantic import TypeAdapter

from meshserve.outputs import Logprob
from meshserve.sampling import SamplingParams
from meshserve.serve.protocol import DeltaFunctionCall, DeltaToolCall
from meshserve.serve.responses_logprobs import TextLogprobs, message_start
from meshserve.serve.responses_output import in_progress
from meshserve.serve.responses_protocol import InputTokensDetails, ResponsesRequest, ResponseUsage
from meshserve.serve.responses_stream import ResponseEvents

openai = pytest.importorskip("openai")
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

STREAM_EVENT = TypeAdapter(ResponseStreamEvent)
USAGE = ResponseUsage(input_tokens=5, output_tokens=9, total_tokens=14,
                      input_tokens_details=InputTokensDetails(cached_tokens=0))


def _events(raw: list[str]):
    out = []
    for text in raw:
        kind, data = text.split("\n")[:2]
        event = STREAM_EVENT.validate_json(data.removeprefix("data: "))
        assert kind == f"event: {event.type}"
        out.append(event)
    assert [e.sequence_number for e in out] == list(range(len(out)))
    return out


def _base():
    req = ResponsesRequest.model_validate({"input": "x", "tools": [{"type": "function", "name": "f"}]})
    return in_progress(req, "resp_1", "m", SamplingParams())


def _call(index, arguments, name=None):
    return DeltaToolCall(index=index, id=f"call_{index}" if name else None, type="function" if name else None,
                         function=DeltaFunctionCall(name=name, arguments=arguments))


def test_text_then_two_calls_accumulate_in_the_sdk():
    s = ResponseEvents(_base())
    raw = s.start() + s.text("I will ") + s.text("check.") + s.call(_call(0, '{"a"', "f")) + s.call(_call(0, ": 1}"))
    raw += s.call(_call(1, "{}", "f")) + s.finish(USAGE, incomplete=False)
    events = _events(raw)
    assert [e.type for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",  # a call closes it
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",  # the next call closes the first
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    final = events[-1].response
    assert [o.type for o in final.output] == ["message", "function_call", "function_call"]
    assert final.output[0].content[0].text == "I will check."
    assert [(o.call_id, o.arguments, o.status) for o in final.output[1:]] == [
        ("call_0", '{"a": 1}', "completed"), ("call_1", "{}", "completed")]
    assert [e.output_index for e in events if e.type == "response.output_item.done"] == [0, 1, 2]
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    for e in events:
        state.handle_event(e)  # the SDK asserts each delta lands on an item of its kind
    rebuilt = state._completed_response
    assert json.loads(rebuilt.output[1].arguments) == {"a": 1} and rebuilt.output[0].content[0].text == "I will check."


def test_nothing_written_still_gets_a_message_and_the_limit_marks_the_last_item():
    s = ResponseEvents(_base())
    events = _events(s.start() + s.finish(USAGE, incomplete=True))
    final = events[-1]
    assert final.type == "response.incomplete" and final.response.incomplete_details.reason == "max_output_tokens"
    assert final.response.output[0].content[0].text == "" and final.response.output[0].status == "incomplete"
    s = ResponseEvents(_base())
    events = _events(s.start() + s.text("a") + s.call(_call(0, '{"x', "f")) + s.finish(USAGE, incomplete=True))
    statuses = [o.status for o in events[-1].response.output]
    assert statuses == ["completed", "incomplete"]  # the text was done; the call was being written


def test_failure_keeps_what_was_written():
    s = ResponseEvents(_base())
    events = _events(s.start() + s.text("partial") + s.fail(RuntimeError("x")))
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and failed.output[0].content[0].text == "partial"


def test_whitespace_only_answer_is_sent_once():
    """Whitespace held back (it might come before a tool call) goes out once at the end, as the whole response
    has it (tests/serve/test_responses_differential.py, seed 21 request 1: "\\t" streamed as "\\t\\t")."""
    s = ResponseEvents(_base())
    events = _events(s.start() + s.text("\t") + s.text(" ") + s.finish(USAGE, incomplete=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "\t "
    assert events[-1].response.output[0].content[0].text == "\t "


# -- logprobs: the message's tokens only (responses_logprobs.py) ---------------------------------------------------
def _scored(texts: list[str]) -> TextLogprobs:
    """Logprobs of tokens 0.. spelling `texts`, each with one alternative (token 99)."""
    lp = TextLogprobs(top_k=1)
    lp.add(list(range(len(texts))), [{k: Logprob(-0.5 - k, 2, t), 99: Logprob(-0.1, 1, "alt")}
                                     for k, t in enumerate(texts)])
    return lp


THOUGHT_THEN_CALL = ["<think>", "hm", "</think>", "\n\nHi", " there", "<tool_call>", '{"name": "f"}', "</tool_call>"]


def test_whole_logprobs_keep_the_message_tokens_only():
    """Reasoning and tool-call tokens are left out; a token across the think tag's end goes whole."""
    text = "".join(THOUGHT_THEN_CALL)
    after, content = text[text.index("\n\n"):], "\n\nHi there"
    lp = _scored(THOUGHT_THEN_CALL)
    lp.start = message_start(text, after, content)
    taken = lp.take(len(content))
    assert "".join(e["token"] for e in taken) == content and [e["logprob"] for e in taken] == [-3.5, -4.5]
    assert [[t["token"] for t in e["top_logprobs"]] for e in taken] == [["alt"], ["alt"]]
    across = _scored(["<think>", "hm</think>", "Hi", "<tool_call>"])  # "hm</think>" wrote no message text
    across.start = message_start("<think>hm</think>Hi<tool_call>", "Hi<tool_call>", "Hi")
    assert [e["token"] for e in across.take(2)] == ["Hi"]
    across = _scored(["<think>", "hm", "</think>Hi", "<tool_call>"])
    across.start = message_start("<think>hm</think>Hi<tool_call>", "Hi<tool_call>", "Hi")
    assert [e["token"] for e in across.take(2)] == ["</think>Hi"]


def test_streamed_logprobs_follow_the_text_deltas():
    lp = _scored(THOUGHT_THEN_CALL)
    s = ResponseEvents(_base(), lp)
    raw = s.start() + s.reasoning("hm")
    lp.start = len("<think>hm</think>")  # where the answer's text begins (serving_responses.py sets it)
    raw += s.text("\n\nHi") + s.text(" the") + s.text("re") + s.call(_call(0, "{}", "f")) + s.finish(USAGE, False)
    events = _events(raw)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [[x.token for x in e.logprobs] for e in deltas] == [["\n\nHi"], [" there"], []]  # a token once
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert [x.token for x in done.logprobs] == ["\n\nHi", " there"]
    reasoning, message, _ = events[-1].response.output
    assert [x.token for x in message.content[0].logprobs] == ["\n\nHi", " there"]
    assert reasoning.type == "reasoning"  # its text carries no logprobs (OpenAI's shape has none)
