"""Tool-call parsers: the model's text -> (content, tool calls), by the format its chat template teaches.

Named as vLLM names them for --tool-call-parser.
"""

from __future__ import annotations

from meshserve.serve.tool_parsers.base import ParsedToolCall, PartialToolCall, PartialToolCalls, ToolParser
from meshserve.serve.tool_parsers.deepseek_v3 import DeepSeekV3ToolParser
from meshserve.serve.tool_parsers.deepseek_v31 import DeepSeekV31ToolParser
from meshserve.serve.tool_parsers.hermes import HermesToolParser
from meshserve.serve.tool_parsers.llama3_json import Llama3JsonToolParser
from meshserve.serve.tool_parsers.mistral import MistralToolParser
from meshserve.serve.tool_parsers.pythonic import PythonicToolParser
from meshserve.serve.tool_parsers.qwen3_coder import Qwen3CoderToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "deepseek_v3": DeepSeekV3ToolParser,
    "deepseek_v31": DeepSeekV31ToolParser,
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "llama4_json": Llama3JsonToolParser,  # Llama 4 writes Llama 3's JSON calls too
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
    "llama4_pythonic": PythonicToolParser,
    "qwen3_coder": Qwen3CoderToolParser,
}

__all__ = ["TOOL_PARSERS", "ParsedToolCall", "PartialToolCall", "PartialToolCalls", "ToolParser", "get_tool_parser"]


def get_tool_parser(name: str, tools: list[dict] | None = None) -> ToolParser:
    """A parser for one request; tools: the request's tools (the parsers that type values by them read them)."""
    try:
        cls = TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose from {sorted(TOOL_PARSERS)}") from None
    return cls(tools)
