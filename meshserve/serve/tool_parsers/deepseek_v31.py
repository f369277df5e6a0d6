"""DeepSeek-V3.1 format (--tool-call-parser deepseek_v31; V3.1 and V3.1-Terminus): as V3's (deepseek_v3.py,
whose rules apply) but each call is `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>`, with
no type and no code fence. As vLLM 0.26 reads it: the name runs from the begin marker to the first
`<｜tool▁sep｜>` of its line, the arguments from there to the first `<｜tool▁call▁end｜>` of the same line."""

from __future__ import annotations

from meshserve.serve.tool_parsers.deepseek_v3 import SEP, WAIT, DeepSeekToolParserBase


class DeepSeekV31ToolParser(DeepSeekToolParserBase):
    fence = ""

    def _head(self, text: str, i: int) -> tuple[str, str, int] | str | None:
        sep = text.find(SEP, i)
        line_end = text.find("\n", i)
        if 0 <= line_end < sep or (sep < 0 and line_end >= 0):
            return None  # the line ends before any separator
        if sep < 0:
            return WAIT
        return "function", text[i:sep], sep + len(SEP)
