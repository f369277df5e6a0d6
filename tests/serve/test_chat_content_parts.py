"""What a message's content is when it reaches the chat template, as vLLM hands it over
(chat_utils._parse_chat_message_content), and vLLM's add_special_tokens on chat requests.

openai format (--chat-template-content-format openai, or auto with a template that loops over the content): each
text part the request gave stays a part, a string is one part, no content is no parts, and a tool message's text
parts are joined into one string. string format: the parts joined by newlines, no content "".
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from meshserve.engine.chat_content_format import with_content_format
from meshserve.serve.config import ServeConfig
from tests.serve.conftest import MODEL, adding_bos, start_server

# loops over the parts where the content is a list, prints a string as it is, and shows a list's length
LOOPS = ("{% for m in messages %}{{ m['role'] }}"
         "{% if m['content'] is string %}={{ m['content'] }}"
         "{% else %}[{{ m['content'] | length }}]{% for p in m['content'] %}<{{ p['type'] }}:{{ p['text'] }}>"
         "{% endfor %}{% endif %};{% endfor %}")
READS_A_STRING = "{% for m in messages %}{{ m['role'] }}={{ m['content'] }};{% endfor %}"
PARTS = [{"type": "text", "text": "a"}, {"type": "input_text", "text": "b"}, "c"]
CALL = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
CONVERSATION = [{"role": "system", "content": "sys"},
                {"role": "user", "content": PARTS},
                {"role": "assistant", "content": None, "tool_calls": CALL},
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "x"},
                                                                   {"type": "text", "text": "y"}]},
                {"role": "tool", "tool_call_id": "c1", "content": "z"}]


def _server(tiny_engine, content_format: str, template: str):
    return start_server(tiny_engine, ServeConfig(served_model_names=[MODEL], chat_template=template,
                                                 chat_template_content_format=content_format))


def _render(http: httpx.Client, messages=CONVERSATION, **body) -> str:
    r = http.post("/tokenize", json={"model": MODEL, "messages": messages, "add_generation_prompt": False, **body})
    assert r.status_code == 200, r.text
    return http.post("/detokenize", json={"model": MODEL, "tokens": r.json()["tokens"]}).json()["prompt"]


@pytest.mark.parametrize("content_format", ["openai", "auto"])
def test_openai_format_keeps_each_part_for_the_template(tiny_engine, content_format):
    srv = _server(tiny_engine, content_format, LOOPS)
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            assert _render(http) == ("system[1]<text:sys>;user[3]<text:a><text:b><text:c>;assistant[0];"
                                     "tool=x\ny;tool=z;")
            r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CONVERSATION[:2],
                                                        "max_tokens": 1, "add_generation_prompt": False})
            assert r.status_code == 200, r.text
            rendered = "system[1]<text:sys>;user[3]<text:a><text:b><text:c>;"
            assert r.json()["usage"]["prompt_tokens"] == len(tiny_engine.tokenizer(rendered).input_ids)
    finally:
        srv.stop()


def test_string_format_joins_the_parts(tiny_engine):
    srv = _server(tiny_engine, "auto", READS_A_STRING)
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            assert _render(http) == "system=sys;user=a\nb\nc;assistant=;tool=x\ny;tool=z;"
    finally:
        srv.stop()


def test_with_content_format_is_vllms_conversation():
    given = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
             {"role": "assistant", "content": None},
             {"role": "user", "content": "s"},
             {"role": "tool", "content": "t", "tool_call_id": "c"},
             {"role": "tool", "content": None}]
    assert with_content_format(given, "openai") == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": []},
        {"role": "user", "content": [{"type": "text", "text": "s"}]},
        {"role": "tool", "content": "t", "tool_call_id": "c"},
        {"role": "tool", "content": ""}]
    assert with_content_format(given, "string") == [
        {"role": "user", "content": "a\nb"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "s"},
        {"role": "tool", "content": "t", "tool_call_id": "c"}, {"role": "tool", "content": ""}]
    assert given[1]["content"] is None  # the caller's messages are left as they were


@pytest.fixture()
def bos_tokenizer(live):
    with adding_bos(live.allm.tokenizer) as tokenizer:
        yield tokenizer


def test_add_special_tokens_adds_the_tokenizers_bos_to_the_rendered_prompt(http, live, bos_tokenizer):
    """vLLM's chat field (default false): the rendered text tokenized with special tokens, on top of the template's
    own (here the template writes none, so one BOS comes first)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    plain = http.post("/v1/chat/completions", json=body).json()["usage"]["prompt_tokens"]
    with_bos = http.post("/v1/chat/completions", json={**body, "add_special_tokens": True})
    assert with_bos.status_code == 200, with_bos.text
    assert with_bos.json()["usage"]["prompt_tokens"] == plain + 1
    assert http.post("/v1/chat/completions", json={**body, "add_special_tokens": False}).json()["usage"][
        "prompt_tokens"] == plain
    client = live.app.state.engine_client
    messages = [{"role": "user", "content": "hi"}]
    ids = asyncio.run(client.render_chat(messages, True, None))
    assert asyncio.run(client.render_chat(messages, True, None, add_special_tokens=True)) == [0, *ids]


def test_add_special_tokens_doubles_a_bos_the_template_wrote(tiny_engine, bos_tokenizer):
    srv = _server(tiny_engine, "auto", "<|endoftext|>" + READS_A_STRING)
    try:
        client = srv.app.state.engine_client
        messages = [{"role": "user", "content": "hi"}]
        ids = asyncio.run(client.render_chat(messages, False, None))
        assert ids[0] == 0 and ids[1] != 0
        assert asyncio.run(client.render_chat(messages, False, None, add_special_tokens=True))[:2] == [0, 0]
    finally:
        srv.stop()


def test_tokenize_defaults_add_special_tokens_by_kind(http, bos_tokenizer):
    """vLLM's /tokenize: add_special_tokens defaults to true for a prompt and to false for messages, and is
    honoured for both when given."""
    def ids(**body):
        r = http.post("/tokenize", json={"model": MODEL, **body})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    messages = [{"role": "user", "content": "hi"}]
    chat = ids(messages=messages)
    assert chat[0] != 0 and ids(messages=messages, add_special_tokens=True) == [0, *chat]
    prompt = ids(prompt="hi")
    assert prompt[0] == 0 and ids(prompt="hi", add_special_tokens=False) == prompt[1:]
