"""DeepSeek-V3.1 hybrid thinking (--reasoning-parser deepseek_v3), as vLLM 0.26's deepseek_v3 parser: with
`"chat_template_kwargs": {"thinking": true}` (or `enable_thinking`), which V3.1's template answers by opening
`<think>` in the prompt, the output is read by deepseek_r1's rules (reasoning up to `</think>`); without it
the parser does not read the output (`reads` is False): all content, as written, no tag looked for, not even a
leading `<think>`, and a structured output holds from the first token."""

from __future__ import annotations

from typing import Any

from meshserve.serve.reasoning.base import ReasoningParser


def thinking_requested(template_kwargs: dict[str, Any] | None) -> bool:
    """vLLM's switch: `thinking` or `enable_thinking` in chat_template_kwargs, read as Python truth."""
    kwargs = template_kwargs or {}
    return bool(kwargs.get("thinking", False)) or bool(kwargs.get("enable_thinking", False))


class DeepSeekV3ReasoningParser(ReasoningParser):
    name = "deepseek_v3"

    def reads(self, template_kwargs: dict[str, Any] | None) -> bool:
        return thinking_requested(template_kwargs)
