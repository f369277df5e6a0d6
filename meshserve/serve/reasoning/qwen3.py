"""Qwen3 (and Qwen3.5, QwQ-style templates): `<think> ... </think>`. The template may open the span in the
prompt (Qwen3.5) or leave the model to write `<think>` (Qwen3 up to 2507). With enable_thinking=False in
chat_template_kwargs the output is content unless it opens the span itself, as in vLLM's qwen3 parser
(whose templates then also close an empty span in the prompt)."""

from __future__ import annotations

from typing import Any

from meshserve.serve.reasoning.base import ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"

    def starts_in_reasoning_by_default(self, template_kwargs: dict[str, Any] | None) -> bool:
        return (template_kwargs or {}).get("enable_thinking", True) is not False
