"""DeepSeek-R1 (and QwQ-32B): `<think> ... </think>`. Newer R1 templates open the span in the prompt, so
the output may start inside it without a start tag: everything up to `</think>` is reasoning, and an output
that never writes `</think>` is all reasoning, as in vLLM's deepseek_r1 parser."""

from __future__ import annotations

from meshserve.serve.reasoning.base import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
