"""Logprobs of the Responses API's output text: `include: ["message.output_text.logprobs"]` and/or
`top_logprobs: N` (0-20) ask for them. The chat request then asks for every output token's logprob (with N
alternatives each, responses_input.py), and they go onto the message's output_text part as OpenAI's
`logprobs: [{token, bytes, logprob, top_logprobs: [{token, bytes, logprob}]}]` (streamed: each
response.output_text.delta carries its own, response.output_text.done the whole list). Without either, each
part and event carries `logprobs: []`, as OpenAI's.

How the tokens are split: OpenAI attaches logprobs to output_text only, so the tokens of reasoning text and of
tool calls (and of a stop string or EOS after the text) are left out. Each token's text (chat's `token`, decoded
on its own) is laid end to end, which places it at a character span of the whole output; the message's text is
a span of that output too (after the reasoning, before the first tool call), and a token belongs to the
message when the two spans overlap. A token across a boundary (one holding both the end of a think tag and the
answer's first word) goes with the message whole, so that every character of the text has its token. Token
texts are in context (logprobs.py): a token that only holds part of a multi-byte character is empty, at the
start of the character its bytes end, and goes with the span that holds that character (a message that opens
on a split character keeps its first tokens). Where a token's text differs from the output (a special token
the output skips) the spans drift by those characters; for plain text the tokens concatenated are the text.
"""

from __future__ import annotations

from typing import Any

from meshserve.outputs import PositionLogprobs
from meshserve.serve.logprobs import chat_logprobs
from meshserve.serve.responses_protocol import ResponsesRequest

OUTPUT_TEXT_LOGPROBS = "message.output_text.logprobs"


def wants_logprobs(req: ResponsesRequest) -> bool:
    return bool(req.top_logprobs) or (req.include is not None and OUTPUT_TEXT_LOGPROBS in req.include)


class TextLogprobs:
    """One output's token logprobs (added as they come), handed to the message's text span by span."""

    def __init__(self, top_k: int):
        self.top_k = top_k
        self.entries: list[dict[str, Any]] = []
        self.ends: list[int] = []  # each token's end, in characters of the output laid end to end
        self.start: int | None = None  # where the message's text begins in the output (set once it is known)
        self.given = 0  # entries handed out (or passed over: before the message)

    def add(self, token_ids: list[int], positions: list[PositionLogprobs] | None) -> None:
        for tid, pos in zip(token_ids, positions or []):
            for entry in chat_logprobs([tid], [pos], self.top_k):
                self.entries.append(entry.model_dump(mode="json"))
                self.ends.append((self.ends[-1] if self.ends else 0) + len(entry.token))

    def take(self, message_end: int) -> list[dict[str, Any]]:
        """The entries not given yet of the tokens that wrote the message's text up to `message_end` (its
        characters so far); those wholly before the message are passed over."""
        if self.start is None:
            return []
        start, end = self.start, self.start + message_end
        out = []
        while self.given < len(self.entries):
            k = self.given
            begin = self.ends[k - 1] if k else 0
            if begin >= end:  # not reached yet (or after the message)
                break
            # overlaps the message (else wholly before it: passed over); an empty token (part of a character)
            # at the message's start belongs to its first character
            if self.ends[k] > start or begin == start:
                out.append(self.entries[k])
            self.given += 1
        return out


def message_start(output_text: str, after_reasoning: str | None, content: str) -> int:
    """Where the message's text `content` begins in the whole output: in the text after the reasoning (the
    output's end), before any tool call."""
    after = output_text if after_reasoning is None else after_reasoning
    base = len(output_text) - len(after) if output_text.endswith(after) else max(output_text.rfind(after), 0)
    return base + max(after.find(content), 0)
