"""A seeded random set of /v1/responses bodies (string and item-list input, multi-turn histories with
function_call, function_call_output and reasoning items, instructions, tools and every tool_choice,
text.format, stop strings, tiny and larger max_output_tokens, greedy and seeded sampling, unicode), the chat
completion each amounts to (written here from OpenAI's documented semantics, not by meshserve's converter),
and the checks of one streamed answer: every event parses as the SDK's ResponseStreamEvent, sequence numbers
run 0..n-1, each item is opened once and closed once in order, deltas add up to the done texts, and the last
event carries exactly the items streamed."""

from __future__ import annotations

import functools
import json
import random
from typing import Any

import httpx
from pydantic import TypeAdapter

from tests.serve.api_workload import PIECES, STOPS

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                          "required": ["city"], "additionalProperties": False}}
CLOCK = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                          "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "n"], "additionalProperties": False}


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 5)))


def _content(rng: random.Random, part_type: str):
    if rng.random() < 0.6:
        return _text(rng)
    return [{"type": part_type, "text": _text(rng)} for _ in range(rng.randint(1, 3))]


def _history(rng: random.Random, k: int) -> list[dict]:
    """A conversation of items ending on a user message or a function call's output."""
    items: list[dict] = []
    for turn in range(rng.randint(0, 2)):
        items.append({"role": "user", "content": _content(rng, "input_text")})
        if rng.random() < 0.3:  # an earlier response's reasoning item, passed back
            items.append({"type": "reasoning", "id": f"rs_{k}_{turn}", "summary": [],
                          "content": [{"type": "reasoning_text", "text": _text(rng)}]})
        if rng.random() < 0.5:
            items.append({"type": "message", "role": "assistant", "id": f"msg_{k}_{turn}", "status": "completed",
                          "content": [{"type": "output_text", "text": _text(rng), "annotations": []}]})
        if rng.random() < 0.5:
            calls = [{"type": "function_call", "call_id": f"call_{k}_{turn}_{c}", "name": "get_weather",
                      "arguments": json.dumps({"city": rng.choice(["Rome", "Paris", "東京"])})}
                     for c in range(rng.randint(1, 2))]
            items += calls  # the calls of one turn, then their outputs
            for call in calls:
                items.append({"type": "function_call_output", "call_id": call["call_id"],
                              "output": _content(rng, "input_text") if rng.random() < 0.3 else '{"temp": 21}'})
            if rng.random() < 0.5:
                return items  # the model answers after the tool's output
    if rng.random() < 0.2:
        items.append({"role": rng.choice(["system", "developer"]), "content": _text(rng)})
    items.append({"role": "user", "content": _content(rng, "input_text")})
    return items


def make_responses_requests(seed: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for k in range(count):
        body: dict[str, Any] = {"model": "tiny", "temperature": 0.0,
                                "max_output_tokens": rng.choice([1, 2, 3, rng.randint(4, 40)])}
        body["input"] = _text(rng) if rng.random() < 0.4 else _history(rng, k)
        if rng.random() < 0.4:
            body["instructions"] = _text(rng)
        if rng.random() < 0.35:
            body.update(temperature=rng.uniform(0.5, 1.3), seed=rng.randrange(2**31))
            if rng.random() < 0.5:
                body.update(top_p=rng.uniform(0.5, 1.0), top_k=rng.choice([0, 5, 40]))
        r = rng.random()
        if r < 0.35:
            body["tools"] = rng.sample([WEATHER, CLOCK], rng.randint(1, 2))
            choice = rng.choice([None, "none", "auto", "required", "named"])
            if choice == "named":
                body["tool_choice"] = {"type": "function", "name": rng.choice(body["tools"])["name"]}
                body["max_output_tokens"] = rng.choice([2, 60])
            elif choice is not None:
                body["tool_choice"] = choice
            if choice == "required":
                body["max_output_tokens"] = rng.choice([3, 80])
            if rng.random() < 0.3:
                body["parallel_tool_calls"] = False
        elif r < 0.5:
            body["text"] = {"format": rng.choice([
                {"type": "json_schema", "name": "thing", "schema": SCHEMA, "strict": True},
                {"type": "json_object"}, {"type": "text"}])}
        if rng.random() < 0.3:
            body["stop"] = rng.sample(STOPS, rng.randint(1, 3))
        if rng.random() < 0.25:
            body["ignore_eos"] = True
        out.append(body)
    return out


# -- the same conversation as a chat completion -------------------------------------------------------------
def _joined(content) -> str:
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content)


def as_chat(body: dict) -> dict:
    """The chat completion a Responses body amounts to: instructions as the system message first, a string
    input as one user message, function calls as the assistant turn's tool_calls, their outputs as tool
    messages, reasoning items left out; tools and tool_choice in chat's nested shapes."""
    messages: list[dict] = []
    if "instructions" in body:
        messages.append({"role": "system", "content": body["instructions"]})
    items = [{"role": "user", "content": body["input"]}] if isinstance(body["input"], str) else body["input"]
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item["role"], "content": _joined(item["content"])})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _joined(item["output"])})
    chat = {"model": body["model"], "messages": messages, "max_completion_tokens": body["max_output_tokens"]}
    for key in ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "parallel_tool_calls"):
        if key in body:
            chat[key] = body[key]
    if "tools" in body:
        chat["tools"] = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
                         for t in body["tools"]]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None:
        chat["tool_choice"] = choice
    fmt = (body.get("text") or {}).get("format")
    if fmt and fmt["type"] == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt and fmt["type"] == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt["name"], "schema": fmt["schema"], "strict": fmt.get("strict")}}
    return chat


# -- reading answers ------------------------------------------------------------------------------------------
@functools.cache  # building the SDK's adapters takes longer than a request
def _adapters():
    from openai.types.responses import Response, ResponseStreamEvent

    return TypeAdapter(ResponseStreamEvent), TypeAdapter(Response)


def post_whole(http: httpx.Client, url: str, body: dict) -> dict:
    """The whole response, validated by the SDK's Response model."""
    r = http.post(url, json=dict(body, stream=False))
    assert r.status_code == 200, (r.status_code, r.text, body)
    _adapters()[1].validate_python(r.json())
    return r.json()


def post_stream(http: httpx.Client, url: str, body: dict) -> list[dict]:
    """The stream's events (their data), each validated as the SDK's ResponseStreamEvent with an `event:` line
    naming its type."""
    stream_event = _adapters()[0]
    events, kind = [], None
    with http.stream("POST", url, json=dict(body, stream=True)) as r:
        assert r.status_code == 200, (r.status_code, r.read(), body)
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                stream_event.validate_python(data)
                assert data["type"] == kind, (data, kind)
                events.append(data)
    return events


_TEXT_EVENTS = {  # delta event -> (done event, item type, the done event's text field)
    "response.output_text.delta": ("response.output_text.done", "message", "text"),
    "response.reasoning_text.delta": ("response.reasoning_text.done", "reasoning", "text"),
    "response.function_call_arguments.delta": ("response.function_call_arguments.done", "function_call", "arguments"),
}
_DONE_EVENTS = {done: delta for delta, (done, _, _) in _TEXT_EVENTS.items()}


def _item_text(item: dict) -> str:
    if item["type"] == "function_call":
        return item["arguments"]
    return "".join(p["text"] for p in item["content"])


def check_stream(events: list[dict], where: str) -> dict:
    """The structural invariants of one response's events; returns the response the last event carries."""
    assert [e["sequence_number"] for e in events] == list(range(len(events))), where
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"], (where, kinds)
    terminal = ("response.completed", "response.incomplete", "response.failed")
    assert kinds[-1] in terminal and not any(k in terminal for k in kinds[:-1]), (where, kinds)
    assert kinds[-1] != "response.failed", (where, events[-2:])
    rid = events[0]["response"]["id"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == [], where
    items: list[dict] = []  # by output_index: the item as added, then as done
    texts: list[str] = []  # deltas so far per item
    open_index: int | None = None
    done_texts: dict[tuple[int, str], str] = {}
    for e in events[2:-1]:
        at = f"{where} event {e['sequence_number']} {e['type']}"
        kind = e["type"]
        if kind == "response.output_item.added":
            assert open_index is None, f"{at}: item {open_index} still open"  # items come one after another
            assert e["output_index"] == len(items), at
            assert e["item"]["status"] == "in_progress", at
            assert _item_text(e["item"]) == "", at
            items.append(e["item"])
            texts.append("")
            open_index = e["output_index"]
            continue
        assert open_index is not None and e["output_index"] == open_index, f"{at}: not on the open item"
        item = items[open_index]
        if "item_id" in e:
            assert e["item_id"] == item["id"], at
        if kind in _TEXT_EVENTS:
            assert item["type"] == _TEXT_EVENTS[kind][1], at
            assert e["delta"], f"{at}: an empty delta"
            texts[open_index] += e["delta"]
        elif kind in _DONE_EVENTS:
            _, item_type, field = _TEXT_EVENTS[_DONE_EVENTS[kind]]
            assert item["type"] == item_type and (open_index, kind) not in done_texts, at
            assert e[field] == texts[open_index], f"{at}: done text differs from the deltas"
            done_texts[(open_index, kind)] = e[field]
        elif kind in ("response.content_part.added", "response.content_part.done"):
            assert item["type"] in ("message", "reasoning") and e["content_index"] == 0, at
            if kind.endswith("done"):
                assert e["part"]["text"] == texts[open_index], at
        elif kind == "response.output_item.done":
            done = e["item"]
            assert done["id"] == item["id"] and done["type"] == item["type"], at
            assert _item_text(done) == texts[open_index], f"{at}: item text differs from its deltas"
            assert done["status"] in ("completed", "incomplete"), at
            if item["type"] != "function_call":
                assert (open_index, _TEXT_EVENTS[next(d for d, v in _TEXT_EVENTS.items()
                                                      if v[1] == item["type"])][0]) in done_texts, at
            else:
                assert (open_index, "response.function_call_arguments.done") in done_texts, at
                assert (done["name"], done["call_id"]) == (item["name"], item["call_id"]), at
            items[open_index] = done
            open_index = None
        else:
            raise AssertionError(f"{at}: unexpected event")
    assert open_index is None, f"{where}: item {open_index} never closed"
    final = events[-1]["response"]
    assert final["id"] == rid, where
    assert final["output"] == items, f"{where}: the final response's items differ from the streamed ones"
    assert final["status"] == {"response.completed": "completed", "response.incomplete": "incomplete"}[kinds[-1]]
    return final


def summary(response: dict) -> dict:
    """What whole and streamed answers must agree on: items (without their random ids), status, usage
    (without cached tokens: the second of two equal requests hits the prefix cache)."""
    items = []
    for item in response["output"]:
        s = {"type": item["type"], "status": item["status"]}
        if item["type"] == "function_call":
            s.update(name=item["name"], arguments=item["arguments"])
        else:
            s["texts"] = [p["text"] for p in item["content"]]
        items.append(s)
    usage = dict(response["usage"])
    usage.pop("input_tokens_details", None)
    return {"status": response["status"], "incomplete_details": response["incomplete_details"],
            "output": items, "usage": usage}
