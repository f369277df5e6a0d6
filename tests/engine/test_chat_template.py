"""engine/chat_template.render_chat: the chat template's token ids, a prefilled assistant turn left open, and
one-line errors for what a template cannot render."""

from __future__ import annotations

import pytest

from meshserve.engine.chat_template import render_chat
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
    ({"add_generation_prompt": True, "continue_final_message": True}, "cannot both be true"),
    ({"add_generation_prompt": False, "continue_final_message": True, "messages": CONVERSATION[:1]},
     "last message to be an assistant turn"),
    ({"chat_template": "{% for m in messages %}{{ m['content'] | nosuchfilter }}{% endfor %}"},
     "cannot apply the chat template"),
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
    with pytest.raises(InvalidArgumentError, match="no chat template"):
        render_chat(bare, CONVERSATION)
