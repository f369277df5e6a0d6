"""Streaming an output through a parser in every possible way: the deltas' concatenation must equal the
whole output's split, for every split point (a tag cut anywhere never leaks into either field)."""

from __future__ import annotations

import itertools

from meshserve.serve.reasoning import ReasoningParser


def stream_split(parser: ReasoningParser, deltas: list[tuple[str, list[int]]], in_reasoning: bool):
    """(reasoning, content) joined from streaming the deltas, None for empty as the whole split has it."""
    stream = parser.stream(in_reasoning)
    reasoning = content = ""
    for text, ids in deltas:
        d = stream.feed(text, ids)
        reasoning, content = reasoning + d.reasoning, content + d.content
    d = stream.finish()
    return (reasoning + d.reasoning) or None, (content + d.content) or None


def text_splits(text: str, max_cuts: int = 2):
    """Every way to cut the text into up to max_cuts + 1 deltas (text mode: no token ids)."""
    for cuts in range(max_cuts + 1):
        for points in itertools.combinations(range(1, len(text)), cuts):
            bounds = (0, *points, len(text))
            yield [(text[a:b], []) for a, b in itertools.pairwise(bounds)]


def token_splits(tokenizer, ids: list[int]):
    """Every cut of the ids into two deltas, and one delta per token; each delta's text is what decoding
    the ids so far adds (as the detokenizer streams it)."""
    def deltas(bounds):
        out, prev = [], ""
        for a, b in itertools.pairwise(bounds):
            now = tokenizer.decode(ids[:b])
            out.append((now[len(prev):], ids[a:b]))
            prev = now
        return out

    for cut in range(1, len(ids)):
        yield deltas((0, cut, len(ids)))
    yield deltas(tuple(range(len(ids) + 1)))


def check_every_split(parser: ReasoningParser, text: str, ids: list[int] | None, in_reasoning: bool, expected):
    assert parser.extract(text, ids, in_reasoning) == expected
    splits = token_splits(parser._test_tokenizer, ids) if ids else text_splits(text)
    for deltas in splits:
        assert stream_split(parser, deltas, in_reasoning) == expected, deltas
