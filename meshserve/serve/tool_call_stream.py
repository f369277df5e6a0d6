"""Streamed tool calls, as OpenAI sends them and its SDK accumulates them: a call's first delta carries its
index, id, type and name (and the arguments written so far, often ""), later deltas only argument
fragments; content that may still turn out to be a call waits, and so does leading whitespace (the whole
response has no content when only whitespace comes before its calls).

Each step re-reads the output written so far (the parsers are stateless; their scans resume where the
last step's stopped, through the text's GrowingText memo, so a call writing a file stays linear) and sends
the difference from what this choice has sent. Arguments are the model's own text, so the fragments add up
to exactly the arguments of the whole response; at the end the whole output is parsed as the whole
response is, and whatever that adds goes out.
"""

from __future__ import annotations

import logging

from meshserve.serve.protocol import DeltaFunctionCall, DeltaToolCall
from meshserve.serve.tool_parsers.json_spans import GrowingText
from meshserve.serve.tool_calls import ToolPlan, new_tool_call_id

logger = logging.getLogger(__name__)


class ToolCallStream:
    """One choice's stream: how much of its content and of each call's arguments has gone out."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.content_sent = 0
        self.ids: list[str] = []
        self.arguments_sent: list[str] = []
        self.text: GrowingText | None = None

    def step(self, text: str) -> tuple[str | None, list[DeltaToolCall]]:
        """The new content and call deltas of the output so far."""
        text = self.text = GrowingText.extending(text, self.text)
        found = self.plan.extract_partial(text)
        end = found.content_end
        if not text[:end].strip():  # whitespace alone so far: held, as the whole answer drops it before a call
            end = self.content_sent
        content = text[self.content_sent:end] or None
        self.content_sent = max(self.content_sent, end)
        return content, self._deltas([(c.name, c.arguments) for c in found.calls])

    def finish(self, text: str) -> tuple[str | None, list[DeltaToolCall], bool]:
        """The last content and call deltas of the finished output, and whether it holds calls. An output
        whose begun call is cut short or followed by a malformed one keeps the calls begun (ToolPlan.extract
        reads it so, as the stream cannot take them back); one that never completed a call's name sends its
        held text as content, as the whole response carries it."""
        content, calls = self.plan.extract(GrowingText.extending(text, self.text))
        rest = (content or "")[self.content_sent:] or None
        self.content_sent = max(self.content_sent, len(content or ""))
        return rest, self._deltas([(c.function.name, c.function.arguments) for c in calls]), bool(calls)

    def _deltas(self, calls: list[tuple[str, str]]) -> list[DeltaToolCall]:
        out = []
        for k, (name, arguments) in enumerate(calls):
            arguments = str(arguments)  # a plain str: a parser may hand back the GrowingText itself (msgspec
            # refuses str subclasses)
            if k == len(self.ids):
                self.ids.append(new_tool_call_id())
                self.arguments_sent.append(arguments)
                out.append(DeltaToolCall(index=k, id=self.ids[k], type="function",
                                         function=DeltaFunctionCall(name=name, arguments=arguments)))
                continue
            sent = self.arguments_sent[k]
            if len(arguments) > len(sent) and arguments.startswith(sent):
                out.append(DeltaToolCall(index=k, function=DeltaFunctionCall(arguments=arguments[len(sent):])))
                self.arguments_sent[k] = arguments
            elif not arguments.startswith(sent):  # a parser broke its promise of final prefixes
                logger.warning("tool call %d: arguments %r do not extend the %r already streamed", k, arguments, sent)
        return out
