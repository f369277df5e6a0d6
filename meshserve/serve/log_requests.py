"""--enable-log-requests (vLLM's): one log line per generation request, its prompt cut to --max-log-len."""

from __future__ import annotations

import logging
from typing import Any

from meshserve.sampling import SamplingParams

logger = logging.getLogger("meshserve.requests")


def _cut(value, max_len: int | None):
    return value if max_len is None else value[:max_len]


def log_request(request_id: str, prompts: list[Any], params: SamplingParams, max_len: int | None) -> None:
    """Each prompt (text and token ids, each cut to max_len characters / ids) with the sampling parameters."""
    for i, prompt in enumerate(prompts):
        text = prompt if isinstance(prompt, str) else prompt.get("prompt") if isinstance(prompt, dict) else None
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        if isinstance(prompt, list):
            ids = prompt
        logger.info("Received request %s-%d: prompt: %r, params: %s, prompt_token_ids: %s", request_id, i,
                    _cut(text, max_len) if text is not None else None, params,
                    _cut(list(ids), max_len) if ids is not None else None)
