"""Mistral's reasoning models (Magistral): `[THINK] ... [/THINK]`, as vLLM 0.26's mistral parser splits them.

Unlike the `<think>` parsers, an output is reasoning only where it opens the span itself: without `[THINK]` it is
all content (never "a thought cut short"). vLLM's rules (its extract_reasoning, on the text with both tags
kept; streamed output adds up to the same split here):
- text before the first `[THINK]` is content (a well-trained model writes none), the text after it up to the
  first `[/THINK]` is reasoning (a nested `[THINK]` in it stays reasoning text), the rest content as written;
  a `[THINK]` never closed leaves the rest reasoning (cut by max_tokens);
- a `[/THINK]` before any `[THINK]` is dropped and the output stays content (vLLM drops the first such tag;
  when a `[THINK]` follows later vLLM keeps it as content, which no stream can know as it passes: dropped here).

Both tags are special tokens of the tekken vocabulary (`[THINK]` and `[/THINK]` in Magistral's tokenizer.json),
found here by id; such requests keep special tokens in their text (vLLM's Mistral tokenizer keeps these two
when skipping special tokens). A tokenizer without them falls back to the text, tags cut across deltas held back.

Where meshserve goes beyond vLLM's text split: a prompt whose last tag is `[THINK]` (an assistant turn prefilled
with it, continue_final_message) starts the output inside the span, as every meshserve parser reads the prompt,
so the text up to `[/THINK]` is reasoning (vLLM calls it content). Magistral's system prompt closes its
`[THINK]...[/THINK]` example, so its outputs start outside. A structured output then holds from the first token
(as vLLM's when the prompt closed a span: the answer is constrained, with no thought), or after `[/THINK]` when
the prompt opened the span.
"""

from __future__ import annotations

from typing import Any

from meshserve.serve.reasoning.base import ReasoningDelta, ReasoningParser, ReasoningStream
from meshserve.serve.tool_parsers.base import held_back

BEGIN_THINK = "[THINK]"
END_THINK = "[/THINK]"


class MistralReasoningParser(ReasoningParser):
    name = "mistral"
    start_tag = BEGIN_THINK
    end_tag = END_THINK

    def starts_in_reasoning_by_default(self, template_kwargs: dict[str, Any] | None) -> bool:
        """Outside the span: only a `[THINK]` of the output (or an open one ending the prompt) starts it."""
        return False

    def stream(self, in_reasoning: bool, by_ids: bool = True) -> ReasoningStream:
        return MistralReasoningStream(self, bool(in_reasoning), by_ids and self.token_mode)


class MistralReasoningStream(ReasoningStream):
    """One choice's output. Phases: "open" (inside a span the prompt opened; a leading `[THINK]` is dropped),
    "before" (no span yet: content, until a `[THINK]` opens one), "reasoning", "content" (the rest, as written).
    By ids, a tag counts once its token is in the output so far (its first occurrence in the text pending)."""

    def __init__(self, parser: ReasoningParser, in_reasoning: bool, by_ids: bool):
        super().__init__(parser, in_reasoning, by_ids)
        self.phase = "open" if in_reasoning else "before"
        self.start_seen = False  # by ids: the [THINK] token is in the output so far
        self.stray_dropped = False  # a [/THINK] before any [THINK] was dropped (vLLM drops only the first)

    def feed(self, text: str, token_ids: list[int] | tuple[int, ...] = ()) -> ReasoningDelta:
        p = self.parser
        if self.by_ids and token_ids:
            if self.first_id is None:
                self.first_id = token_ids[0]
            self.start_seen = self.start_seen or p.start_id in token_ids
            self.end_seen = self.end_seen or p.end_id in token_ids
        self.pending += text
        out = ReasoningDelta()
        while self.pending:
            phase, left = self.phase, len(self.pending)
            if phase == "open":
                self._open()  # ReasoningStream's: drops a leading [THINK], or waits while the text may be one
            elif phase == "before":
                self._before(out)
            elif phase == "reasoning":
                self._reasoning(out)  # ReasoningStream's: up to the end tag, its beginning held back
            else:
                out.content += self.pending
                self.pending = ""
            if self.phase == phase and len(self.pending) == left:
                break  # what is left may begin a tag: it waits for more
        return out

    def finish(self) -> ReasoningDelta:
        rest, self.pending = self.pending, ""
        if self.phase == "open":
            self.phase = "reasoning"
        return ReasoningDelta(reasoning=rest) if self.phase == "reasoning" else ReasoningDelta(content=rest)

    def _before(self, out: ReasoningDelta) -> None:
        """Content up to the first `[THINK]` (dropped, the span opens) or a stray `[/THINK]` (dropped, once);
        text that may begin either waits."""
        text = self.pending
        look_start = not self.by_ids or self.start_seen
        look_end = not self.stray_dropped and (not self.by_ids or self.end_seen)
        start = text.find(BEGIN_THINK) if look_start else -1
        end = text.find(END_THINK) if look_end else -1
        if end >= 0 and (start < 0 or end < start):
            out.content += text[:end]
            self.pending = text[end + len(END_THINK):]
            self.stray_dropped = True
        elif start >= 0:
            out.content += text[:start]
            self.pending = text[start + len(BEGIN_THINK):]
            self.phase = "reasoning"
        else:
            wait = max(held_back(text, BEGIN_THINK) if look_start else 0,
                       held_back(text, END_THINK) if look_end else 0)
            out.content += text[:len(text) - wait]
            self.pending = text[len(text) - wait:]
