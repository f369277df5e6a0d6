"""engine/chat_template.render_chat: the chat template's token ids, a prefilled assistant turn left open, and
one-line errors for what a template cannot render."""

from __future__ import annotations

import pytest

from meshserve.engine.chat_template import render_chat, text_content
from meshserve.errors import InvalidArgumentError
from tests.conftest import _train_tokenizer

CONVERSATION = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]


@pytest.fixture(scope="module")
def tok():
    return _train_tokenizer(300)


def test_generation_prompt_opens_a_new_assistant_turn(tok):
    ids = render_chat(tok, CONVERSATION[:1])
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ids == list(tok.apply_chat_template(CONVERSATION[:1], tokenize=True, add_generation_prompt=True)["input_ids"])


def test_continue_final_message_leaves_the_assistant_turn_open(tok):
    ids = render_chat(tok, CONVERSATION, add_generation_prompt=False, continue_final_message=True)
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\nhello there") and text.count("<|im_end|>") == 1
    closed = tok.decode(render_chat(tok, CONVERSATION, add_generation_prompt=False))
    assert closed == text + "<|im_end|>\n"


def test_reserved_template_kwargs_are_not_passed_through(tok):
    ids = render_chat(tok, CONVERSATION[:1], template_kwargs={"tokenize": False, "add_generation_prompt": False})
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("kwargs, match", [
    ({"add_generation_prompt": True, "continue_final_message": True},
     "Cannot set both `continue_final_message` and `add_generation_prompt` to True"),  # vLLM's words
    ({"chat_template": "{% for m in messages %}{{ m['content'] | nosuchfilter }}{% endfor %}"},
     "cannot apply the chat template"),
    ({"chat_template": "{{ raise_exception('roles must alternate') }}"}, "roles must alternate"),
])
def test_bad_requests_are_one_line_errors(tok, kwargs, match):
    messages = kwargs.pop("messages", CONVERSATION)
    with pytest.raises(InvalidArgumentError, match=match):
        render_chat(tok, messages, **kwargs)


def test_no_tokenizer_or_no_template_is_an_error(tok):
    with pytest.raises(InvalidArgumentError, match="no tokenizer"):
        render_chat(None, CONVERSATION)
    bare = _train_tokenizer(300)
    bare.chat_template = None
    with pytest.raises(InvalidArgumentError, match="default chat template is no longer allowed"):
        render_chat(bare, CONVERSATION)


def test_continue_final_message_leaves_any_last_message_open(tok):
    """vLLM checks no role: transformers leaves a last user message open as it would an assistant's."""
    ids = render_chat(tok, CONVERSATION[:1], add_generation_prompt=False, continue_final_message=True)
    assert tok.decode(ids) == "<|im_start|>user\nhi"


ARGS_TEMPLATE = ("{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.name }}("
                 "{% for k, v in c.function.arguments.items() %}{{ k }}={{ v }};{% endfor %}){% endfor %}"
                 "{% if m.tool_calls is defined %}!{% endif %}{% endfor %}")


def test_tool_call_arguments_reach_the_template_as_objects(tok):
    """vLLM's _postprocess_messages: JSON text parsed, text that is no JSON an empty object, an empty list of
    calls dropped; the caller's messages are not changed."""
    calls = [{"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}},
             {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{not json"}}]
    messages = [{"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "assistant", "content": "x", "tool_calls": []}]
    ids = render_chat(tok, messages, chat_template=ARGS_TEMPLATE, add_generation_prompt=False)
    assert tok.decode(ids) == "f(city=Paris;)g()!"
    assert calls[0]["function"]["arguments"] == '{"city": "Paris"}' and messages[1]["tool_calls"] == []


def test_text_parts_read_as_vllm_reads_them():
    content = ["bare", {"type": "input_text", "text": "a"}, {"type": "refusal", "refusal": "no"},
               {"type": "text", "text": None}, {"type": "text", "text": "b"}]
    assert text_content([{"role": "user", "content": content}]) == [{"role": "user", "content": "bare\na\nno\nb"}]
    with pytest.raises(InvalidArgumentError, match="of type file, input_audio are not supported"):
        text_content([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}},
                                                    {"type": "file", "file": {}}]}])
