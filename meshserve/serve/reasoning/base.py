"""What every reasoning parser offers: a model output split into its reasoning span and its content, whole
or as it streams, with vLLM's rules for `<think> ... </think>` models.

The rules (one state machine, so a streamed choice adds up to exactly the whole response's split):
- a request starts inside the reasoning span or outside it (`starts_in_reasoning`): outside when its prompt
  already closed the span (the last tag in the prompt is the end tag: a template that disabled thinking) or
  when the parser's own rule says so (qwen3 with enable_thinking=False);
- an output that opens with the start tag is reasoning after it, whatever the prompt did (models that write
  `<think>` themselves); the tag itself goes nowhere;
- inside the span, text up to the first end tag is reasoning and the rest content; an output that never
  closes the span is all reasoning (cut short by max_tokens, as vLLM reads it); a parser may also end the span
  without the tag (`implicit_end`: qwen3's XML tool call), that text then starting the content;
- outside the span, everything is content.

Where both tags are single tokens of the vocabulary (Qwen3, DeepSeek-R1, QwQ) the parser works on token ids:
a tag counts only where its token is in the output, and the prompt's state is read from its ids. Otherwise it
falls back to text: any occurrence of a tag counts, and while streaming, text that may be the beginning of a
tag waits for the next delta, so a tag split across deltas never shows in either field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from meshserve.serve.tool_parsers.base import held_back


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""

    def __iadd__(self, other: ReasoningDelta) -> Self:
        self.reasoning += other.reasoning
        self.content += other.content
        return self


def _single_token_id(tokenizer: Any, tag: str) -> int | None:
    """The id of the tag when the vocabulary holds it as one token, else None."""
    if tokenizer is None:
        return None
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary: text mode
        return None
    token_id = vocab.get(tag)
    return int(token_id) if token_id is not None else None


def _is_special(tokenizer: Any, token_id: int) -> bool:
    """Whether decoding with skip_special_tokens drops the token (it is marked special)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    token = added.get(token_id)
    return bool(getattr(token, "special", False)) or token_id in set(getattr(tokenizer, "all_special_ids", []) or [])


class ReasoningParser:
    """A model family's reasoning tags, bound to the served tokenizer (token mode when both tags are single
    tokens, text mode otherwise). Stateless: each choice streams through its own ReasoningStream."""

    name = ""
    start_tag = "<think>"
    end_tag = "</think>"

    def __init__(self, tokenizer: Any = None):
        self.start_id = _single_token_id(tokenizer, self.start_tag)
        self.end_id = _single_token_id(tokenizer, self.end_tag)
        self.token_mode = self.start_id is not None and self.end_id is not None
        if not self.token_mode:
            self.start_id = self.end_id = None
        # tags the detokenizer would drop (marked special): the output must keep special tokens to show them
        self.keeps_special_tokens = self.token_mode and any(
            _is_special(tokenizer, t) for t in (self.start_id, self.end_id))

    # -- the parser's own rules ------------------------------------------------------------------
    def reads(self, template_kwargs: dict[str, Any] | None) -> bool:
        """Whether this request's output is read for reasoning at all; False: it is all content, as written (no
        tag looked for, a structured output holding from the first token). True unless a parser says otherwise
        (deepseek_v3: only when thinking is asked for)."""
        return True

    def starts_in_reasoning_by_default(self, template_kwargs: dict[str, Any] | None) -> bool:
        """Where an output starts when the prompt holds no tag: inside the span (both of vLLM's parsers)."""
        return True

    def implicit_end(self, text: str) -> tuple[int, int]:
        """Where in reasoning text something that ends the span without the end tag begins (-1: nowhere), and
        from where the text must wait for more to tell (len(text): nothing waits). None by default."""
        return -1, len(text)

    # -- the request's state ---------------------------------------------------------------------
    def prompt_state(self, prompt_ids: list[int] | None = None, prompt_text: str | None = None) -> bool | None:
        """Whether the prompt leaves the span open (True), closed (False), or holds no tag (None): its last
        tag decides. Token ids in token mode, else the prompt's text."""
        if self.token_mode and prompt_ids is not None:
            for token in reversed(prompt_ids):
                if token == self.start_id:
                    return True
                if token == self.end_id:
                    return False
            return None
        if prompt_text is None:
            return None
        start, end = prompt_text.rfind(self.start_tag), prompt_text.rfind(self.end_tag)
        if start < 0 and end < 0:
            return None
        return start > end

    def starts_in_reasoning(self, template_kwargs: dict[str, Any] | None, prompt_ids: list[int] | None = None,
                            prompt_text: str | None = None) -> bool:
        state = self.prompt_state(prompt_ids, prompt_text)
        return self.starts_in_reasoning_by_default(template_kwargs) if state is None else state

    # -- outputs ---------------------------------------------------------------------------------
    def stream(self, in_reasoning: bool, by_ids: bool = True) -> ReasoningStream:
        """A choice's stream; by_ids=False: by the text alone even in token mode (no ids to go by)."""
        return ReasoningStream(self, in_reasoning, by_ids and self.token_mode)

    def extract(self, text: str, token_ids: list[int] | None, in_reasoning: bool) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output, each None when empty: the stream's split, in one delta.
        Without token ids (None) the text alone decides."""
        stream = self.stream(in_reasoning, by_ids=token_ids is not None)
        whole = stream.feed(text, token_ids or [])
        whole += stream.finish()
        return whole.reasoning or None, whole.content or None


class ReasoningStream:
    """One choice's output as it streams: each delta's text and token ids in, its reasoning and content out.

    Phases: "open" (the output's first characters, which may be the start tag), "reasoning", "content".
    Text that may still turn out to be a tag is held in `pending` until a later delta or finish() settles it.
    """

    def __init__(self, parser: ReasoningParser, in_reasoning: bool, by_ids: bool):
        self.parser = parser
        self.in_reasoning = in_reasoning
        self.by_ids = by_ids  # tags count only as their tokens (the parser's token mode)
        self.phase = "open"
        self.pending = ""
        self.first_id: int | None = None  # the output's first token (token mode: does it open the span?)
        self.end_seen = False  # token mode: the end tag's token is in the output so far

    def feed(self, text: str, token_ids: list[int] | tuple[int, ...] = ()) -> ReasoningDelta:
        p = self.parser
        if self.by_ids and token_ids:
            if self.first_id is None:
                self.first_id = token_ids[0]
            self.end_seen = self.end_seen or p.end_id in token_ids
        self.pending += text
        out = ReasoningDelta()
        while self.pending:
            if self.phase == "open":
                if not self._open():
                    break  # the start tag may still be coming
            elif self.phase == "reasoning":
                self._reasoning(out)
                if self.phase == "reasoning":
                    break
            else:
                out.content += self.pending
                self.pending = ""
        return out

    def finish(self) -> ReasoningDelta:
        """What is still held back once the output is complete (no tag can follow any more)."""
        rest, self.pending = self.pending, ""
        if self.phase == "open":
            self.phase = "reasoning" if self.in_reasoning else "content"
        return ReasoningDelta(reasoning=rest) if self.phase == "reasoning" else ReasoningDelta(content=rest)

    def _open(self) -> bool:
        """Settle whether the output opens with the start tag; False while the text so far cannot tell."""
        p, tag = self.parser, self.parser.start_tag
        may_open = self.first_id == p.start_id if self.by_ids else True
        if may_open and self.pending.startswith(tag):
            self.pending = self.pending[len(tag):]
            self.phase = "reasoning"
            return True
        if may_open and tag.startswith(self.pending):
            return False
        self.phase = "reasoning" if self.in_reasoning else "content"
        return True

    def _reasoning(self, out: ReasoningDelta) -> None:
        """Reasoning up to the end tag (dropped) or an implicit end (kept: it begins the content); text that
        may still begin either waits."""
        p, text = self.parser, self.pending
        use_end = not self.by_ids or self.end_seen  # by ids: no end token yet, no end tag in the text
        end = text.find(p.end_tag) if use_end else -1
        implicit, wait_from = p.implicit_end(text)
        if end >= 0 and (implicit < 0 or end < implicit):
            out.reasoning += text[:end]
            self.pending = text[end + len(p.end_tag):]
            self.phase = "content"
        elif implicit >= 0:
            out.reasoning += text[:implicit]
            self.pending = text[implicit:]
            self.phase = "content"
        else:
            if use_end:
                wait_from = min(wait_from, len(text) - held_back(text, p.end_tag))
            out.reasoning += text[:wait_from]
            self.pending = text[wait_from:]
