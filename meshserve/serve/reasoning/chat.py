"""Reasoning in /v1/chat/completions: where a request's output starts (inside the span or not), what that
asks of the engine, and each choice's split into `reasoning` and `content`, whole or streamed.

Tool calls are read from the content alone (the text after the reasoning), as in vLLM. A structured output
(response_format, structured_outputs, guided_*, tool_choice "required" or a named function) holds only after
the reasoning: the engine starts the grammar once the end tag's token appears in the output, or from the
first token when the prompt already closed the span. That needs the end tag as one token; a parser in text
mode refuses the combination (400) rather than constrain the thinking too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshserve.errors import InvalidArgumentError
from meshserve.sampling import SamplingParams
from meshserve.serve.config import ServeConfig
from meshserve.serve.protocol import ChatCompletionRequest
from meshserve.serve.reasoning import ReasoningParser, ReasoningStream, get_reasoning_parser

if TYPE_CHECKING:
    from meshserve.serve.engine_client import EngineClient


def server_reasoning_parser(config: ServeConfig, client: EngineClient) -> ReasoningParser | None:
    """The server's --reasoning-parser bound to the model's tokenizer; None when the flag is not given."""
    if not config.reasoning_parser:
        return None
    return get_reasoning_parser(config.reasoning_parser, client.allm.tokenizer)


@dataclass
class ReasoningPlan:
    """One request's reasoning: its parser, whether its output starts inside the span, and whether the
    reasoning is returned (vLLM's include_reasoning)."""

    parser: ReasoningParser
    in_reasoning: bool
    include: bool = True

    def split(self, text: str, token_ids: list[int] | None) -> tuple[str | None, str | None]:
        """(reasoning, content) of a choice's whole output."""
        reasoning, content = self.parser.extract(text, token_ids, self.in_reasoning)
        return (reasoning if self.include else None), content

    def stream(self) -> ChoiceReasoningStream:
        return ChoiceReasoningStream(self.parser.stream(self.in_reasoning), self.include)


@dataclass
class ChoiceReasoningStream:
    """One streamed choice: each delta's reasoning and content, and the content so far (what the tool-call
    parser reads)."""

    stream: ReasoningStream
    include: bool
    content: str = ""
    _done: bool = field(default=False, repr=False)

    def step(self, text: str, token_ids: list[int], finished: bool) -> tuple[str | None, str | None]:
        d = self.stream.feed(text, token_ids)
        if finished and not self._done:
            self._done = True
            d += self.stream.finish()
        self.content += d.content
        return (d.reasoning or None) if self.include else None, d.content or None


async def plan_reasoning(parser: ReasoningParser | None, req: ChatCompletionRequest, prompt_ids: list[int],
                         params: SamplingParams, client: EngineClient) -> ReasoningPlan | None:
    """The request's reasoning plan (None without a parser, or where it does not read this request's output); sets what it asks of the engine on params: the
    special tokens kept when the tags are special, the grammar deferred past the reasoning."""
    if parser is None or not parser.reads(req.chat_template_kwargs):
        return None  # the output is all content, as without a parser
    prompt_text = None if parser.token_mode else await client.decode(prompt_ids)
    in_reasoning = parser.starts_in_reasoning(req.chat_template_kwargs, prompt_ids, prompt_text)
    if parser.keeps_special_tokens:
        params.skip_special_tokens = False  # the tags are special tokens: the text must show them
    if params.structured_outputs is not None and in_reasoning:
        if parser.end_id is None:
            raise InvalidArgumentError(
                f"structured outputs with --reasoning-parser {parser.name} need {parser.end_tag!r} to be a single "
                "token of the model's vocabulary, and it is not", param=_constraint_field(req))
        params.structured_outputs = dataclasses.replace(params.structured_outputs,
                                                        reasoning_end_token_id=parser.end_id)
    return ReasoningPlan(parser, in_reasoning, req.include_reasoning)


def _constraint_field(req: ChatCompletionRequest) -> str:
    """The request field its output constraint came in (tool_choice when none of the structured ones)."""
    rf = req.response_format
    if rf is not None and rf.type != "text":
        return "response_format"
    for name in ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if getattr(req, name) is not None:
            return name
    return "tool_choice"
