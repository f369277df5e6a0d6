"""Engine logprobs (PositionLogprobs per token) -> OpenAI's completions and chat logprobs objects."""

from __future__ import annotations

import math

from meshserve.outputs import Logprob, PositionLogprobs
from meshserve.serve.protocol import CompletionLogprobs, TokenLogprob, TopLogprob


def _finite(x: float) -> float:
    # JSON has no -inf; a token the sampler could never pick gets a very negative but finite logprob
    return x if math.isfinite(x) else -9999.0


def _text(lp: Logprob) -> str:
    return lp.decoded_token if lp.decoded_token is not None else ""


def _top_dict(pos: PositionLogprobs) -> dict[str, float]:
    # distinct tokens can share a text (partial UTF-8 bytes all read "\ufffd"): keep the likeliest
    top: dict[str, float] = {}
    for lp in pos.values():
        key, value = _text(lp), _finite(lp.logprob)
        if key not in top or value > top[key]:
            top[key] = value
    return top


def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs | None],
                        token_texts: list[str] | None = None, text_offset: int = 0) -> CompletionLogprobs:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset.

    A position of None (the first prompt token under echo) has no logprob; its text comes from
    `token_texts`.
    """
    out = CompletionLogprobs()
    offset = text_offset
    for i, (tid, pos) in enumerate(zip(token_ids, positions)):
        chosen = pos.get(tid) if pos else None
        text = _text(chosen) if chosen is not None else (token_texts[i] if token_texts else "")
        out.tokens.append(text)
        out.token_logprobs.append(_finite(chosen.logprob) if chosen is not None else None)
        out.top_logprobs.append(_top_dict(pos) if pos else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], top_k: int) -> list[TokenLogprob]:
    """The chat shape: per token its text, logprob, bytes, and the top_k alternatives by rank."""
    content = []
    for tid, pos in zip(token_ids, positions):
        chosen = pos.get(tid)
        if chosen is None:
            continue
        alternatives = sorted((lp for lp in pos.values() if lp.rank is not None and lp.rank <= top_k),
                              key=lambda lp: lp.rank)
        text = _text(chosen)
        content.append(TokenLogprob(
            token=text, logprob=_finite(chosen.logprob), bytes=list(text.encode("utf-8")),
            top_logprobs=[TopLogprob(token=_text(lp), logprob=_finite(lp.logprob),
                                     bytes=list(_text(lp).encode("utf-8"))) for lp in alternatives[:top_k]]))
    return content
