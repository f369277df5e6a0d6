"""A conversation to prompt token ids through the tokenizer's chat template: one place for `LLM.chat`, the
server's /v1/chat/completions and /tokenize, so they render, check and fail alike."""

from __future__ import annotations

from typing import Any

from meshserve.errors import InvalidArgumentError

# Keys of apply_chat_template that change what it returns rather than what the template sees: a client's
# chat_template_kwargs may not set them.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "chat_template", "tokenize", "add_generation_prompt", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    "continue_final_message", "tools",
})


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
                chat_template: str | None = None, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of `messages` rendered with the chat template (the tokenizer's, or `chat_template`).

    continue_final_message (vLLM's and transformers' name) leaves the last message, an assistant turn, open
    so generation continues its text (a prefilled answer) instead of starting a new turn; it cannot be
    combined with add_generation_prompt, which opens a new assistant turn after it."""
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
        raise InvalidArgumentError("this model's tokenizer has no chat template", param="messages")
    if continue_final_message:
        if add_generation_prompt:
            raise InvalidArgumentError("continue_final_message and add_generation_prompt cannot both be true "
                                       "(set add_generation_prompt to false)", param="continue_final_message")
        if not messages or messages[-1].get("role") != "assistant":
            raise InvalidArgumentError("continue_final_message needs the last message to be an assistant turn",
                                       param="continue_final_message")
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if k not in RESERVED_TEMPLATE_KWARGS}
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=chat_template,
                                             tokenize=tokenize, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except Exception as e:  # jinja errors, raise_exception() in templates, bad kwargs
        raise InvalidArgumentError(f"cannot apply the chat template: {e}", param="messages") from e


def text_content(messages: list[dict[str, Any]], join: bool = True) -> list[dict[str, Any]]:
    """messages with OpenAI's content parts ([{"type": "text", "text": ...}, ...]) joined into one string (join),
    as vLLM joins them (by newlines) for a template that reads content as a string, or kept as parts; other
    parts (images, audio) refused."""
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content]
            if any(k != "text" for k in kinds):
                raise InvalidArgumentError(f"message content parts of type {', '.join(sorted(set(kinds) - {'text'}))} "
                                           "are not supported (text parts only: meshserve serves text models)",
                                           param="messages")
            if join:
                m = {**m, "content": "\n".join(str(p.get("text", "")) for p in content)}
        out.append(m)
    return out

