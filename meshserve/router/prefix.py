"""Prefix keys: what part of a request decides where prefix affinity sends it.

Requests whose prompts share their leading blocks should land on the same replica, so that its prefix
cache hits. A key is the hash of the prompt's leading *whole* blocks (of characters for text, of token
ids for token prompts), at most `max_blocks` of them: prompts that agree on those blocks get the same key,
and a prompt shorter than one block is keyed by all of it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def _leading_blocks(seq: str | list[int], block: int, max_blocks: int) -> str | list[int]:
    n = min(len(seq), block * max_blocks)
    if n >= block:
        n -= n % block
    return seq[:n]


def _digest(kind: str, payload: str | list[int]) -> int:
    raw = payload if isinstance(payload, str) else ",".join(map(str, payload))
    return int.from_bytes(hashlib.blake2b(f"{kind}:{raw}".encode(), digest_size=8).digest(), "big")


def _responses_messages(body: dict[str, Any]) -> list[Any]:
    """A /v1/responses body's instructions and input as chat messages, so it keys as the chat request that
    it is served as (responses_input.py) does."""
    instructions, items = body.get("instructions"), body.get("input")
    system = [{"role": "system", "content": instructions}] if isinstance(instructions, str) else []
    return system + ([{"role": "user", "content": items}] if isinstance(items, str)
                     else items if isinstance(items, list) else [])


def _chat_text(messages: list[Any]) -> str:
    """The messages as one string in order (role + text), so shared system prompts share a prefix."""
    parts: list[str] = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep their text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<{m.get('role', '')}>{content if isinstance(content, str) else ''}")
    return "".join(parts)


def prefix_key(body: dict[str, Any] | None, block_chars: int = 64, block_tokens: int = 16,
               max_blocks: int = 4) -> int | None:
    """A 64-bit key of the request's leading prompt blocks, or None when it has no usable prompt."""
    if not isinstance(body, dict):
        return None
    prompt = body.get("prompt")
    if prompt is None and isinstance(body.get("messages"), list):
        prompt = _chat_text(body["messages"])
    if prompt is None and "input" in body:
        prompt = _chat_text(_responses_messages(body))
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        prompt = prompt[0]  # a batch: the first prompt decides
    if isinstance(prompt, str) and prompt:
        return _digest("text", _leading_blocks(prompt, block_chars, max_blocks))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return _digest("ids", _leading_blocks(prompt, block_tokens, max_blocks))
    return None


def parse_body(raw: bytes) -> dict[str, Any] | None:
    """The request body as a dict, or None if it is not a JSON object (the replica will say why)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None
