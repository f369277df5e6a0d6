"""DeepSeek-V3 format (--tool-call-parser deepseek_v3; DeepSeek-V3, V3-0324, R1-0528): content, then
`<｜tool▁calls▁begin｜>`, then per call
`<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGUMENTS\\n```<｜tool▁call▁end｜>`, then
`<｜tool▁calls▁end｜>`. deepseek_v31.py holds V3.1's shorter call (no type, no code fence).

vLLM 0.26's reading, which the whole response keeps exactly:
- no `<｜tool▁calls▁begin｜>` in the output: all of it is content;
- otherwise the content is the text before that marker (None when only whitespace) and the calls are every
  `<｜tool▁call▁begin｜>` that a call follows on its own terms: in V3 the type and the name fill the marker's
  line (the name after the line's last `<｜tool▁sep｜>`), the next line is "```json", the arguments are the one
  line after it and the line after them starts with "```<｜tool▁call▁end｜>"; anything between calls, and after
  them, is dropped (so a begin marker whose calls all fail to match leaves the text before it as the content);
- a call whose type is not "function" makes the whole output content, with no calls (vLLM's ToolCall refuses
  the type);
- the arguments are the model's text as written (not checked as JSON), the name too (not stripped).
The markers are ordinary (not special) added tokens in DeepSeek's tokenizers, so, as in vLLM, requests keep
skip_special_tokens as they ask.

Streaming reads the same calls as they grow: a call from its complete head (V3: once "```json" follows the
name; V3.1: at `<｜tool▁sep｜>`), its arguments up to what may still begin the closing marker. A call that
vLLM's pattern would not take after all (arguments over several lines, a closing fence written differently,
the output cut short) has been streamed by then: as for the other parsers, the whole response then carries the
calls as streamed (ToolPlan.extract), arguments as written up to `<｜tool▁call▁end｜>` (or up to
`<｜tool▁calls▁end｜>` when the call was left unclosed; the code fence dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.serve.tool_parsers.base import (
    ParsedToolCall,
    PartialToolCall,
    PartialToolCalls,
    ToolParser,
    held_back,
)

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"

WAIT = "wait"  # a call head the text written so far cannot settle yet


@dataclass
class _Call:
    name: str
    arguments: str
    done: bool  # its closing marker is written, as the format has it


class _TypeRefused(Exception):
    """A matched call whose type is not "function": vLLM reads the whole output as content."""


class DeepSeekToolParserBase(ToolParser):
    """The calls-begin marker and the scan over call begin markers; subclasses read a call's head."""

    fence = ""  # what the format writes between the arguments and <｜tool▁call▁end｜>

    def _head(self, text: str, i: int) -> tuple[str, str, int] | str | None:
        """The call whose begin marker ends at i: (type, name, where the arguments start); WAIT while the text
        so far cannot tell; None when no call of the format starts here."""
        raise NotImplementedError

    def _scan(self, text: str, strict: bool) -> list[_Call]:
        """The calls, in order. strict: vLLM's pattern (arguments on one line, the exact closing; a call it
        does not match is skipped, a type other than "function" raises _TypeRefused). Otherwise as a stream
        sees them: arguments up to the first <｜tool▁call▁end｜> (or <｜tool▁calls▁end｜>: a call left unclosed),
        the last call still growing, and a call of another type ends the scan (it is never streamed)."""
        closer = self.fence + CALL_END
        calls: list[_Call] = []
        i = 0
        while (b := text.find(CALL_BEGIN, i)) >= 0:
            head = self._head(text, b + len(CALL_BEGIN))
            if head == WAIT:
                break
            if head is None:
                i = b + 1
                continue
            kind, name, start = head  # type: ignore[misc]
            if strict:
                end = text.find(closer, start)
                if end < 0 or "\n" in text[start:end]:
                    i = b + 1
                    continue
                if kind != "function":
                    raise _TypeRefused(kind)
                calls.append(_Call(name, text[start:end], True))
                i = end + len(closer)
                continue
            if kind != "function":
                break
            ends = [(k, m) for m in (CALL_END, CALLS_END) if (k := text.find(m, start)) >= 0]
            if not ends:  # still being written: hold back what may begin the closing
                rest = text[start:]
                hold = max(held_back(rest, f + m) for f in ("", self.fence) for m in (CALL_END, CALLS_END))
                calls.append(_Call(name, rest[:len(rest) - hold], False))
                break
            end, marker = min(ends)  # <｜tool▁calls▁end｜> first: the call was left unclosed
            fenced = end - len(self.fence) >= start and text.startswith(self.fence, end - len(self.fence))
            calls.append(_Call(name, text[start:end - len(self.fence) if fenced else end],
                               fenced and marker == CALL_END))
            i = end + len(marker)
        return calls

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        start = text.find(CALLS_BEGIN)
        if start < 0:
            return text, []
        try:
            matched = self._scan(text, strict=True)
        except _TypeRefused:
            return text, []
        content = text[:start] if text[:start].strip() else None
        seen = self._scan(text, strict=False)
        if not all(c.done for c in seen) or [(c.name, c.arguments) for c in seen] != [
                (c.name, c.arguments) for c in matched]:
            # vLLM's pattern reads fewer or other calls than a stream has sent: ToolPlan.extract keeps the calls
            # as streamed (none begun: the content before the marker, as vLLM has it)
            return content, []
        return content, [ParsedToolCall(c.name, c.arguments) for c in matched]

    def extract_partial(self, text: str) -> PartialToolCalls:
        start = text.find(CALLS_BEGIN)
        if start < 0:
            return PartialToolCalls(len(text) - held_back(text, CALLS_BEGIN))
        return PartialToolCalls(start, [PartialToolCall(c.name, c.arguments) for c in self._scan(text, strict=False)])


_JSON_FENCE = "\n```json\n"


class DeepSeekV3ToolParser(DeepSeekToolParserBase):
    fence = "\n```"

    def _head(self, text: str, i: int) -> tuple[str, str, int] | str | None:
        line_end = text.find("\n", i)
        if line_end < 0:
            return WAIT
        line = text[i:line_end]
        sep = line.rfind(SEP)
        if sep < 0:
            return None
        after = text[line_end:line_end + len(_JSON_FENCE)]
        if after != _JSON_FENCE:
            return WAIT if _JSON_FENCE.startswith(after) else None
        return line[:sep], line[sep + len(SEP):], line_end + len(_JSON_FENCE)
