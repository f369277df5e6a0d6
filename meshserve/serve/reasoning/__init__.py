"""Reasoning parsers: a reasoning model's output -> (reasoning, content), by the tags its template uses.

Named as vLLM names them for --reasoning-parser. Chat completions only (vLLM applies them to chat alone).
"""

from __future__ import annotations

from typing import Any

from meshserve.serve.reasoning.base import ReasoningDelta, ReasoningParser, ReasoningStream
from meshserve.serve.reasoning.deepseek_r1 import DeepSeekR1ReasoningParser
from meshserve.serve.reasoning.deepseek_v3 import DeepSeekV3ReasoningParser
from meshserve.serve.reasoning.mistral import MistralReasoningParser
from meshserve.serve.reasoning.qwen3 import Qwen3ReasoningParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "deepseek_v3": DeepSeekV3ReasoningParser,  # V3.1: deepseek_r1 with thinking on, else all content
    "mistral": MistralReasoningParser,  # Magistral: [THINK] ... [/THINK]; no [THINK] in the output: all content
    "qwen3": Qwen3ReasoningParser,
}

__all__ = ["REASONING_PARSERS", "ReasoningDelta", "ReasoningParser", "ReasoningStream", "get_reasoning_parser"]


def get_reasoning_parser(name: str, tokenizer: Any = None) -> ReasoningParser:
    """The server's parser, bound to its tokenizer (token mode where the tags are single tokens)."""
    try:
        cls = REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose from {sorted(REASONING_PARSERS)}") from None
    return cls(tokenizer)
