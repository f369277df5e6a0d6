"""Tool-call parsers: the model's text -> (content, tool calls), by the format its chat template teaches.

Named as vLLM names them for --tool-call-parser.
"""

from __future__ import annotations

from meshserve.serve.tool_parsers.base import ParsedToolCall, ToolParser
from meshserve.serve.tool_parsers.hermes import HermesToolParser
from meshserve.serve.tool_parsers.llama3_json import Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
}

__all__ = ["TOOL_PARSERS", "ParsedToolCall", "ToolParser", "get_tool_parser"]


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose from {sorted(TOOL_PARSERS)}") from None
