"""--responses-store-size: finished responses kept in memory (least recently used out first) so that
previous_response_id continues one (its conversation without its instructions, as OpenAI's) and GET
/v1/responses/{id} returns it; store=false keeps nothing; the CLI refuses the store with several API processes."""

from __future__ import annotations

import argparse

import httpx
import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.serve.config import ServeConfig
from meshserve.serve.responses_protocol import ResponseObject
from meshserve.serve.responses_store import ResponseStore
from tests.serve.conftest import start_server

openai = pytest.importorskip("openai")

MODEL = "m"
SIZE = 4
WEATHER = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(tiny_engine):
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL], responses_store_size=SIZE))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)


def _text(resp) -> str:
    return resp.output[0].content[0].text


def _create(client, **kw):
    return client.responses.create(model=MODEL, max_output_tokens=6, temperature=0, extra_body={"ignore_eos": True},
                                   **kw)


def _chat(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True}, **kw)


def test_previous_response_id_continues_its_conversation(client):
    first = _create(client, instructions="Be brief.", input="Hi")
    assert first.store is True and client.responses.retrieve(first.id).output == first.output
    second = _create(client, previous_response_id=first.id, input="And then?")
    assert second.previous_response_id == first.id
    # the earlier instructions are not carried over; the earlier input and output are
    chat = _chat(client, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _text(first)},
                          {"role": "user", "content": "And then?"}])
    assert _text(second) == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    third = _create(client, previous_response_id=second.id, input="Thanks", instructions="Be kind.")
    chat = _chat(client, [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": _text(first)}, {"role": "user", "content": "And then?"},
                          {"role": "assistant", "content": _text(second)}, {"role": "user", "content": "Thanks"}])
    assert _text(third) == chat.choices[0].message.content


def test_a_function_call_continued_with_its_output(client):
    call_resp = client.responses.create(model=MODEL, input="Weather in Rome?", tools=[WEATHER],
                                        tool_choice="required", parallel_tool_calls=False, temperature=0,
                                        max_output_tokens=100)
    (call,) = call_resp.output
    answer = _create(client, previous_response_id=call_resp.id, tools=[WEATHER], tool_choice="none",
                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21 C"}])
    chat = _chat(client, [{"role": "user", "content": "Weather in Rome?"},
                          {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function", "function": {
                              "name": call.name, "arguments": call.arguments}}]},
                          {"role": "tool", "tool_call_id": call.call_id, "content": "21 C"}],
                 tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
                 tool_choice="none")
    assert _text(answer) == chat.choices[0].message.content


def test_streamed_responses_are_kept_and_store_false_is_not(client, server):
    events = list(client.responses.create(model=MODEL, input="Hello", max_output_tokens=5, temperature=0,
                                          stream=True))
    final = events[-1].response
    assert final.store is True and client.responses.retrieve(final.id).output == final.output
    unkept = _create(client, input="Hello", store=False)
    assert unkept.store is False
    r = httpx.get(f"{server.v1}/responses/{unkept.id}")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError, match="is not found") as e:
        _create(client, input="x", previous_response_id=unkept.id)
    assert e.value.body["param"] == "previous_response_id"


def test_an_unknown_previous_response_id_has_openais_code(client):
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, input="x", previous_response_id="resp_unknown")
    assert e.value.code == "previous_response_not_found" and e.value.param == "previous_response_id"


def test_delete_forgets_a_response_and_cancel_says_why_not(client, server):
    kept = _create(client, input="Hello")
    r = httpx.post(f"{server.v1}/responses/{kept.id}/cancel")  # was a bare 404: no such route
    assert r.status_code == 400 and "background" in r.json()["error"]["message"], r.text
    r = httpx.delete(f"{server.v1}/responses/{kept.id}")  # was a 405
    assert r.status_code == 200 and r.json() == {"id": kept.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel(kept.id)
    with pytest.raises(openai.BadRequestError, match="is not found"):
        _create(client, input="x", previous_response_id=kept.id)
    again = _create(client, input="Hello")
    assert client.responses.delete(again.id) is None  # through the SDK


def test_input_items_list_the_conversation_before_the_output(client, server):
    """GET .../input_items (a bare 404 before): the earlier conversation and this input, not the instructions,
    in the SDK's ResponseItem shapes, newest first, with ids that page by `after`."""
    from openai.types.responses import ResponseItem
    from pydantic import TypeAdapter

    first = _create(client, instructions="Be brief.", input="Hi")
    second = _create(client, previous_response_id=first.id, input=[
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        {"role": "user", "content": [{"type": "input_text", "text": "And then?"}]}])
    items = list(client.responses.input_items.list(second.id, limit=2))  # the SDK pages through them
    assert [(i.type, getattr(i, "role", None)) for i in items] == [
        ("message", "user"), ("function_call_output", None), ("function_call", None), ("message", "assistant"),
        ("message", "user")]
    assert items[3].content[0].text == _text(first) and items[4].content[0].text == "Hi"
    assert len({i.id for i in items}) == 5
    raw = httpx.get(f"{server.v1}/responses/{second.id}/input_items", params={"order": "asc", "limit": 4}).json()
    assert raw["object"] == "list" and raw["has_more"] is True and raw["last_id"] == items[1].id
    for item in raw["data"]:
        TypeAdapter(ResponseItem).validate_python(item)
    rest = httpx.get(f"{server.v1}/responses/{second.id}/input_items",
                     params={"order": "asc", "after": raw["last_id"]}).json()
    assert [i["id"] for i in rest["data"]] == [items[0].id] and rest["has_more"] is False
    r = httpx.get(f"{server.v1}/responses/{second.id}/input_items", params={"after": "msg_x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_unknown")


def _input_ids(server, response_id: str) -> list[str]:
    r = httpx.get(f"{server.v1}/responses/{response_id}/input_items", params={"order": "asc"})
    assert r.status_code == 200, r.text
    return [item["id"] for item in r.json()["data"]]


def test_input_items_keep_the_ids_the_client_gave(client, server):
    """OpenAI lists an input item under the id it was sent with (vLLM has no input_items); the others get ids
    that stay the same from one listing, and one response, to the next."""
    first = _create(client, input="Hi")
    [hi_id] = _input_ids(server, first.id)
    second = _create(client, previous_response_id=first.id, input=[
        {"type": "reasoning", "id": "rs_mine", "summary": []},
        {"type": "function_call", "id": "fc_mine", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        {"role": "user", "content": "And then?"}])
    ids = _input_ids(server, second.id)
    # the earlier input keeps its id, the earlier output its output item's id
    assert ids[:4] == [hi_id, first.output[0].id, "rs_mine", "fc_mine"]
    assert len(set(ids)) == 6 and ids == _input_ids(server, second.id)
    listed = client.responses.input_items.list(second.id, order="asc", after="fc_mine")  # pages by a client id
    assert [i.id for i in listed] == ids[4:]
    third = _create(client, previous_response_id=second.id, input="More")
    assert _input_ids(server, third.id)[:7] == [*ids, second.output[0].id]


def test_a_message_keeps_its_id(client, server):
    kept = _create(client, input=[
        {"type": "message", "id": "msg_abc", "role": "user", "content": "Hi"},
        {"type": "message", "id": "msg_out", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Hello", "annotations": []}]},
        {"type": "function_call", "id": "fc_x", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "id": "fco_x", "call_id": "c1", "output": "ok"},
        {"role": "user", "content": "And?"}])
    ids = _input_ids(server, kept.id)
    assert ids[:4] == ["msg_abc", "msg_out", "fc_x", "fco_x"] and ids[4].startswith("msg_")
    assert ids == _input_ids(server, kept.id)


def test_the_least_recently_used_response_goes_first(client):
    kept = [_create(client, input=f"n{i}") for i in range(SIZE)]
    client.responses.retrieve(kept[0].id)  # used: now the most recent
    _create(client, input="one more")
    assert client.responses.retrieve(kept[0].id).id == kept[0].id
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept[1].id)


def test_store_unit():
    with pytest.raises(InvalidArgumentError):
        ResponseStore(0)
    store = ResponseStore(1)
    a = ResponseObject(id="resp_a", status="completed", model="m")
    store.put(a, [])
    assert store.conversation_before("resp_a") == [] and len(store) == 1
    store.put(ResponseObject(id="resp_b", status="completed", model="m"), [])
    assert len(store) == 1 and store.get("resp_a") is None
    with pytest.raises(InvalidArgumentError, match="resp_a"):
        store.conversation_before("resp_a")
    assert store.delete("resp_b") and not store.delete("resp_b") and len(store) == 0


def _serve_args(*extra: str) -> argparse.Namespace:
    from meshserve.cli import build_parser

    return build_parser().parse_args(["serve", *extra])


def test_cli_refuses_a_store_several_processes_would_not_share():
    from meshserve.serve.cli import check_responses_store, serve_config_from

    ns = _serve_args("--responses-store-size", "8")
    assert serve_config_from(ns, "m").responses_store_size == 8
    check_responses_store(ns)
    check_responses_store(_serve_args("--responses-store-size", "8", "-dp", "2", "--api-server-count", "1"))
    with pytest.raises(InvalidArgumentError, match=">= 0"):
        serve_config_from(_serve_args("--responses-store-size", "-1"), "m")
    # the router back end: a store in each replica, the router sends a follow-up to its (response_affinity.py)
    check_responses_store(_serve_args("--responses-store-size", "8", "-dp", "2", "--data-parallel-backend", "router"))
    for extra in (["-dp", "2", "--data-parallel-backend", "router", "--api-server-count", "2"], ["-dp", "2"],
                  ["--api-server-count", "2"]):
        with pytest.raises(InvalidArgumentError, match="one API process"):
            check_responses_store(_serve_args("--responses-store-size", "8", *extra))
