"""Engine logprobs (PositionLogprobs per token) -> OpenAI's completions and chat logprobs objects, and vLLM's
prompt_logprobs.

Token texts are the engine's, in context (output_processor.token_texts_in_context): a token that ends inside
a multi-byte character (byte-level BPE splits an emoji or a CJK character over 2-4 tokens) reads "" and the
token that completes the character reads all of it, as vLLM's LogprobsProcessor._verify_tokens corrects them
(where vLLM's correction succeeds; it gives "" to all of a 3-token character and to a prompt's). So the tokens
laid end to end are the text, text_offset indexes the returned text, and chat's `bytes` (the token's text in
UTF-8, as vLLM's _create_chat_logprobs) joined over the tokens are the text's bytes.

as_ids (vLLM's return_tokens_as_token_ids): every token string is "token_id:N" instead of its text, so a
client can tell apart tokens whose texts are empty or alike.
"""

from __future__ import annotations

import math

from meshserve.outputs import Logprob, PositionLogprobs
from meshserve.serve.protocol import (
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TokenLogprob,
    TopLogprob,
)


def _finite(x: float) -> float:
    # JSON has no -inf; a token the sampler could never pick gets a very negative but finite logprob
    return x if math.isfinite(x) else -9999.0


def _text(token_id: int, lp: Logprob, as_ids: bool = False) -> str:
    if as_ids:
        return f"token_id:{token_id}"
    return lp.decoded_token if lp.decoded_token is not None else ""


def _top_dict(pos: PositionLogprobs, as_ids: bool) -> dict[str, float]:
    # distinct tokens can share a text (those that only start a multi-byte character all read ""): keep the
    # likeliest
    top: dict[str, float] = {}
    for tid, lp in pos.items():
        key, value = _text(tid, lp, as_ids), _finite(lp.logprob)
        if key not in top or value > top[key]:
            top[key] = value
    return top


def trim_position(pos: PositionLogprobs | None, token_id: int, k: int) -> PositionLogprobs | None:
    """pos keeping the scored token and the alternatives of rank <= k (one prompt pass can serve a larger k)."""
    if pos is None:
        return None
    return {t: lp for t, lp in pos.items() if t == token_id or (lp.rank is not None and lp.rank <= k)}


def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs | None],
                        token_texts: list[str] | None = None, text_offset: int = 0,
                        as_ids: bool = False) -> CompletionLogprobs:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset.

    A position of None (the first prompt token under echo) has no logprob; its text comes from
    `token_texts`.
    """
    out = CompletionLogprobs()
    offset = text_offset
    for i, (tid, pos) in enumerate(zip(token_ids, positions)):
        chosen = pos.get(tid) if pos else None
        if as_ids:
            text = f"token_id:{tid}"
        else:
            text = _text(tid, chosen) if chosen is not None else (token_texts[i] if token_texts else "")
        out.tokens.append(text)
        out.token_logprobs.append(_finite(chosen.logprob) if chosen is not None else None)
        out.top_logprobs.append(_top_dict(pos, as_ids) if pos else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], top_k: int,
                  as_ids: bool = False) -> list[TokenLogprob]:
    """The chat shape: per token its text, logprob, bytes (its text's UTF-8: [] for a token that only holds
    part of a character, all the character's bytes on the token that completes it), and the top_k alternatives
    by rank."""
    content = []
    for tid, pos in zip(token_ids, positions):
        chosen = pos.get(tid)
        if chosen is None:
            continue
        alternatives = sorted(((t, lp) for t, lp in pos.items() if lp.rank is not None and lp.rank <= top_k),
                              key=lambda item: item[1].rank)
        text = _text(tid, chosen, as_ids)
        content.append(TokenLogprob(
            token=text, logprob=_finite(chosen.logprob), bytes=list(text.encode("utf-8")),
            top_logprobs=[TopLogprob(token=_text(t, lp, as_ids), logprob=_finite(lp.logprob),
                                     bytes=list(_text(t, lp, as_ids).encode("utf-8")))
                          for t, lp in alternatives[:top_k]]))
    return content


def prompt_logprobs(prompt_token_ids: list[int], positions: list[PositionLogprobs | None] | None, k: int,
                    as_ids: bool = False) -> PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token {id: {logprob, rank, decoded_token}} of the token and its top
    k alternatives; None for the first token (nothing scores it) and for a position that was not computed."""
    positions = list(positions or [])
    positions += [None] * (len(prompt_token_ids) - len(positions))
    out: PromptLogprobs = []
    for tid, pos in zip(prompt_token_ids, positions):
        pos = trim_position(pos, tid, k)
        out.append(None if pos is None else {
            t: PromptLogprob(logprob=_finite(lp.logprob), rank=lp.rank,
                             decoded_token=f"token_id:{t}" if as_ids else lp.decoded_token)
            for t, lp in pos.items()})
    return out
