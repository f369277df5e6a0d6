"""DeepSeek-V3.1 hybrid thinking (--reasoning-parser deepseek_v3), as vLLM 0.26's deepseek_v3 parser: with
`"chat_template_kwargs": {"thinking": true}` (or `enable_thinking`), which V3.1's template answers by opening
`<think>` in the prompt, the output is read by deepseek_r1's rules (reasoning up to `</think>`); without it
the output is all content, as written: no tag is looked for, not even a leading `<think>`, and a structured
output holds from the first token."""

from __future__ import annotations

from typing import Any

from meshserve.serve.reasoning.base import ReasoningParser, ReasoningStream


class _ContentOnly:
    """A request's start state when thinking is off: falsy like "starts outside the span" (so a structured
    output holds from the first token), and read by this parser as "no reasoning at all"."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "CONTENT_ONLY"


CONTENT_ONLY: Any = _ContentOnly()


def thinking_requested(template_kwargs: dict[str, Any] | None) -> bool:
    """vLLM's switch: `thinking` or `enable_thinking` in chat_template_kwargs, read as Python truth."""
    kwargs = template_kwargs or {}
    return bool(kwargs.get("thinking", False)) or bool(kwargs.get("enable_thinking", False))


class DeepSeekV3ReasoningParser(ReasoningParser):
    name = "deepseek_v3"

    def starts_in_reasoning(self, template_kwargs: dict[str, Any] | None, prompt_ids: list[int] | None = None,
                            prompt_text: str | None = None) -> bool:
        if not thinking_requested(template_kwargs):
            return CONTENT_ONLY
        return super().starts_in_reasoning(template_kwargs, prompt_ids, prompt_text)

    def stream(self, in_reasoning: bool, by_ids: bool = True) -> ReasoningStream:
        stream = super().stream(bool(in_reasoning), by_ids)
        if in_reasoning is CONTENT_ONLY:
            stream.phase = "content"  # past the opening: every character is content
        return stream
