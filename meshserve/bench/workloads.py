"""The fixed benchmark workloads of ../shared/DESIGN.md, drawn exactly as specified."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class OfflineRequest:
    prompt_token_ids: list[int]
    max_tokens: int


def w1_prompt() -> list[int]:
    """W1 decode-1: 128 token ids, 256 new tokens, greedy, ignore EOS."""
    random.seed(0)
    return [random.randint(0, 10000) for _ in range(128)]


W1_NEW_TOKENS = 256


def w2_requests() -> list[OfflineRequest]:
    """W2 offline (nano-vllm's): 256 prompts of 100-1024 ids, then max_tokens 100-1024 each (temp 0.6)."""
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    return [OfflineRequest(p, random.randint(100, 1024)) for p in prompts]


W2_TEMPERATURE = 0.6
