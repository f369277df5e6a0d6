"""A conversation to prompt token ids through the tokenizer's chat template: one place for `LLM.chat`, the
server's /v1/chat/completions and /tokenize, so they render, check and fail alike."""

from __future__ import annotations

import json
from typing import Any

from meshserve.errors import InvalidArgumentError

# Keys of apply_chat_template that change what it returns rather than what the template sees: a client's
# chat_template_kwargs may not set them.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "chat_template", "tokenize", "add_generation_prompt", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    "continue_final_message", "tools",
})


# vLLM's messages for these refusals, word for word (clients match on them)
BOTH_GENERATION_FLAGS = "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
NO_TEMPLATE = ("As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat "
               "template if the tokenizer does not define one.")

# vLLM's content parts that are text (MM_PARSER_MAP): each part type and the key holding its text
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
              "thinking": "thinking"}


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
                chat_template: str | None = None, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of `messages` rendered with the chat template (the tokenizer's, or `chat_template`).

    continue_final_message (vLLM's and transformers' name) leaves the last message (an assistant turn, most
    often: a prefilled answer) open so generation continues its text instead of starting a new turn; it cannot
    be combined with add_generation_prompt, which opens a new assistant turn after it."""
    ids = _apply(tokenizer, messages, True, add_generation_prompt, continue_final_message, tools, chat_template,
                 template_kwargs)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def render_chat_text(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                     continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
                     chat_template: str | None = None, template_kwargs: dict[str, Any] | None = None) -> str:
    """The text render_chat tokenizes: what vLLM's LLM.chat reports as each output's `prompt`."""
    return _apply(tokenizer, messages, False, add_generation_prompt, continue_final_message, tools, chat_template,
                  template_kwargs)


def _apply(tokenizer: Any, messages: list[dict[str, Any]], tokenize: bool, add_generation_prompt: bool,
           continue_final_message: bool, tools: list[dict[str, Any]] | None, chat_template: str | None,
           template_kwargs: dict[str, Any] | None) -> Any:
    if tokenizer is None:
        raise InvalidArgumentError("this model has no tokenizer, so no chat template", param="messages")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        # vLLM's words (safe_apply_chat_template): a base model's chat is refused rather than guessed at
        raise InvalidArgumentError(NO_TEMPLATE + " (this model's tokenizer has no chat template: give one with "
                                   "--chat-template or LLM.chat's chat_template, or send a plain prompt to "
                                   "/v1/completions)", param="messages")
    # vLLM's check (check_generation_prompt), worded as vLLM words it; vLLM checks no role: transformers leaves
    # whatever the last message is open (continuing a user turn is a way to prefill it)
    if continue_final_message and add_generation_prompt:
        raise InvalidArgumentError(BOTH_GENERATION_FLAGS + " (add_generation_prompt defaults to true: set it to "
                                   "false to continue the final message)", param="continue_final_message")
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if k not in RESERVED_TEMPLATE_KWARGS}
    try:
        return tokenizer.apply_chat_template(_template_conversation(messages), tools=tools or None,
                                             chat_template=chat_template, tokenize=tokenize,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except Exception as e:  # jinja errors, raise_exception() in templates, bad kwargs
        raise InvalidArgumentError(f"cannot apply the chat template: {e}", param="messages") from e


def _template_conversation(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """messages as vLLM hands them to the template (chat_utils._postprocess_messages): an assistant turn's tool
    calls carry their arguments as an object (JSON text parsed; text that is no JSON, or no arguments, become {}),
    and an empty tool_calls list is dropped so the template takes its plain-assistant path. The caller's dicts
    are left as they were (copies are changed)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") if isinstance(m, dict) and m.get("role") == "assistant" else None
        if isinstance(calls, list):
            m = dict(m)
            if not calls:
                del m["tool_calls"]
            else:
                m["tool_calls"] = [_with_arguments_object(c) for c in calls]
        out.append(m)
    return out


def _with_arguments_object(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return call
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = {}
    if not isinstance(arguments, (dict, list)):
        arguments = {}
    return {**call, "function": {**function, "arguments": arguments}}


def text_content(messages: list[dict[str, Any]], join: bool = True) -> list[dict[str, Any]]:
    """messages with OpenAI's content parts ([{"type": "text", "text": ...}, ...]) joined into one string (join),
    as vLLM joins them (by newlines) for a template that reads content as a string, or kept as text parts;
    vLLM's other text parts (input_text, output_text, refusal, thinking, a bare string) read as text parts, and
    other parts (images, audio, files) refused by their type."""
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            parts = text_parts(content)
            m = {**m, "content": "\n".join(p["text"] for p in parts) if join else parts}
        out.append(m)
    return out


def text_parts(content: list[Any]) -> list[dict[str, str]]:
    """A message's content parts as {"type": "text", "text": ...}, or an error naming the parts that are not
    text (meshserve serves text models: an image or an audio clip has nowhere to go)."""
    out, other = [], set()
    for part in content:
        if isinstance(part, str):  # vLLM takes a bare string as a text part
            out.append({"type": "text", "text": part})
            continue
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind is None:
            raise InvalidArgumentError("a message content part has no 'type'", param="messages")
        if kind not in TEXT_PARTS:
            other.add(str(kind))
            continue
        text = part.get(TEXT_PARTS[kind])
        if text is None:  # vLLM skips a text part without its text
            continue
        if not isinstance(text, str):
            raise InvalidArgumentError(f"a content part of type {kind} needs its {TEXT_PARTS[kind]!r} to be a "
                                       f"string, got {type(text).__name__}", param="messages")
        out.append({"type": "text", "text": text})
    if other:
        raise InvalidArgumentError(f"message content parts of type {', '.join(sorted(other))} are not supported "
                                   "(text parts only: meshserve serves text models)", param="messages")
    return out
