"""Qwen3 (and Qwen3.5, QwQ-style templates): `<think> ... </think>`. The template may open the span in the
prompt (Qwen3.5) or leave the model to write `<think>` (Qwen3 up to 2507). With enable_thinking=False in
chat_template_kwargs the output is content unless it opens the span itself, as in vLLM's qwen3 parser
(whose templates then also close an empty span in the prompt).

Qwen3.5 may start an XML tool call inside its thought without closing it: as in vLLM, `<tool_call>` followed
(after whitespace) by `<function=` or `<function ` ends the reasoning, and the call is content (for
--tool-call-parser qwen3_coder). A `<tool_call>` mentioned otherwise (Hermes JSON, or prose) stays reasoning.
"""

from __future__ import annotations

import re
from typing import Any

from meshserve.serve.reasoning.base import ReasoningParser
from meshserve.serve.tool_parsers.base import held_back

TOOL_CALL = "<tool_call>"
_FUNCTION = "<function"
_FUNCTION_OPEN = re.compile(r"<function[\s=]")


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"

    def starts_in_reasoning_by_default(self, template_kwargs: dict[str, Any] | None) -> bool:
        return (template_kwargs or {}).get("enable_thinking", True) is not False

    def implicit_end(self, text: str) -> tuple[int, int]:
        i = text.find(TOOL_CALL)
        while i >= 0:
            rest = text[i + len(TOOL_CALL):].lstrip()
            if _FUNCTION_OPEN.match(rest):
                return i, len(text)
            if _FUNCTION.startswith(rest):  # whitespace, or the start of <function, so far: wait
                return -1, i
            i = text.find(TOOL_CALL, i + 1)
        return -1, len(text) - held_back(text, TOOL_CALL)
