"""The chat-template path's edges as vLLM draws them, through /v1/chat/completions and /tokenize: the generation
flags, what reaches the template (kwargs, documents, tools, tool calls, reasoning, names, text parts), and 400s
that name the problem (media parts, no template, a template that raises)."""

from __future__ import annotations

import json

import httpx
import pytest

from meshserve.serve.config import ServeConfig
from tests.serve.conftest import MODEL, start_server
from tests.serve.test_bad_inputs import assert_error_shape

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
BOTH = "Cannot set both `continue_final_message` and `add_generation_prompt` to True."


@pytest.fixture(scope="module")
def trusted(tiny_engine):
    """A server that takes a request's own chat_template (vLLM's --trust-request-chat-template)."""
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL], trust_request_chat_template=True))
    with httpx.Client(base_url=srv.base_url, timeout=60) as client:
        yield client
    srv.stop()


def _render(http, template: str, messages=USER, **body) -> str:
    """The text the template rendered (the /tokenize ids, decoded)."""
    r = http.post("/tokenize", json={"model": MODEL, "messages": messages, "chat_template": template,
                                     "add_generation_prompt": False, **body})
    assert r.status_code == 200, r.text
    return http.post("/detokenize", json={"model": MODEL, "tokens": r.json()["tokens"]}).json()["prompt"]


def _chat(http, **body) -> httpx.Response:
    return http.post(CHAT, json={"model": MODEL, "messages": USER, "max_tokens": 2, "temperature": 0, **body})


@pytest.mark.parametrize("flags", [{"add_generation_prompt": True, "continue_final_message": True},
                                   {"continue_final_message": True}])  # add_generation_prompt defaults to true
def test_both_generation_flags_are_vllms_400(http, flags):
    messages = [*USER, {"role": "assistant", "content": "hel"}]
    for path in ("/tokenize", CHAT):
        err = assert_error_shape(http.post(path, json={"model": MODEL, "messages": messages, **flags}), 400)
        assert BOTH in err["message"], err


def test_continue_final_message_continues_a_user_turn_as_vllm(http, live):
    """vLLM checks no role (transformers leaves any last message open); the answer then has that role."""
    body = {"add_generation_prompt": False, "continue_final_message": True}
    ids = http.post("/tokenize", json={"model": MODEL, "messages": USER, **body}).json()["tokens"]
    assert live.allm.tokenizer.decode(ids).endswith("user\nhi")
    r = _chat(http, **body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "user"


def test_template_kwargs_documents_and_tools_reach_the_template(trusted):
    template = ("{{ enable_thinking }}|{% for d in documents or [] %}[{{ d.title }}:{{ d.text }}]{% endfor %}|"
                "{% for t in tools or [] %}{{ t.function.name }}{% endfor %}")
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    assert _render(trusted, template, chat_template_kwargs={"enable_thinking": False}, tools=tools) == "False||lookup"
    docs = [{"title": "T", "text": "body"}]
    r = _chat(trusted, chat_template=template, documents=docs, add_generation_prompt=False)
    assert r.status_code == 200, r.text
    plain = _chat(trusted, chat_template=template, add_generation_prompt=False).json()
    assert r.json()["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]  # the documents were rendered


def test_message_fields_reach_the_template(trusted):
    """name, tool_call_id, tool calls with their arguments as objects (vLLM's _postprocess_messages: JSON text
    that is no JSON becomes {}), and an assistant turn's reasoning under both of vLLM's names."""
    template = ("{% for m in messages %}{{ m.role }}"
                "{% if m.name %}@{{ m.name }}{% endif %}{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}"
                "{% if m.reasoning_content %}<{{ m.reasoning_content }}|{{ m.reasoning }}>{% endif %}"
                "{% for c in m.tool_calls or [] %} {{ c.function.name }}("
                "{% for k, v in c.function.arguments.items() %}{{ k }}={{ v }}{% endfor %}){% endfor %}"
                ":{{ m.content }};{% endfor %}")
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"x": 1})}},
             {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{oops"}}]
    messages = [{"role": "user", "content": "q", "name": "ann"},
                {"role": "assistant", "content": None, "tool_calls": calls, "reasoning_content": "think"},
                {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    assert _render(trusted, template, messages) == "user@ann:q;assistant<think|think> f(x=1) g():;tool#c1:42;"


def test_text_parts_joined_or_kept_by_content_format(trusted):
    """A string-reading template gets the text parts joined by newlines (vLLM's rule, its other text part types
    included); one that loops over the parts gets them as parts (a string content as one part)."""
    content = [{"type": "text", "text": "a"}, {"type": "input_text", "text": "b"}, "c"]
    messages = [{"role": "user", "content": content}]
    assert _render(trusted, "{% for m in messages %}{{ m['content'] }}{% endfor %}", messages) == "a\nb\nc"
    loops = "{% for m in messages %}{% for p in m['content'] %}<{{ p['text'] }}>{% endfor %}{% endfor %}"
    parts = [{"role": "user", "content": [{"type": "refusal", "refusal": "r"}]}, {"role": "user", "content": "s"}]
    assert _render(trusted, loops, parts) == "<r><s>"


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                                  {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                                  {"type": "file", "file": {"file_id": "f"}},
                                  {"type": "video_url", "video_url": {"url": "http://x/y.mp4"}}])
def test_media_parts_are_a_400_naming_their_type(http, part):
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}]
    for path in (CHAT, "/tokenize"):
        err = assert_error_shape(http.post(path, json={"model": MODEL, "messages": messages}), 400)
        assert f"type {part['type']} are not supported" in err["message"], err


def test_a_template_that_raises_is_a_400_with_its_message(trusted):
    template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                "{% endif %}{{ m['content'] }}{% endfor %}")
    messages = [*USER, *USER]
    for path in (CHAT, "/tokenize"):
        err = assert_error_shape(trusted.post(path, json={"model": MODEL, "messages": messages,
                                                          "chat_template": template}), 400)
        assert "Conversation roles must alternate" in err["message"], err


def test_a_model_without_a_chat_template_is_a_400(http, live, monkeypatch):
    """vLLM refuses rather than guessing a template for a base model, in its words."""
    monkeypatch.setattr(live.allm.tokenizer, "chat_template", None)
    for path in (CHAT, "/tokenize"):
        err = assert_error_shape(http.post(path, json={"model": MODEL, "messages": USER}), 400)
        assert "default chat template is no longer allowed" in err["message"], err


def test_echo_prepends_the_continued_message(http):
    """vLLM's echo: the last message's content before the answer when the answer has its role (here a
    continued assistant turn), whole and streamed; nothing when the answer opens a new turn."""
    messages = [*USER, {"role": "assistant", "content": "Once"}]
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True, "echo": True,
            "max_tokens": 3, "ignore_eos": True, "temperature": 0}
    whole = _chat(http, **body).json()["choices"][0]["message"]["content"]
    assert whole.startswith("Once") and len(whole) > len("Once")
    with http.stream("POST", CHAT, json={"model": MODEL, **body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert deltas[:2] == ["", "Once"] and "".join(d or "" for d in deltas) == whole
    assert _chat(http, echo=True, max_tokens=1).json()["choices"][0]["message"]["content"] != "hi"
