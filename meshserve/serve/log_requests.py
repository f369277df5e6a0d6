"""--enable-log-requests (vLLM's): one log line per generation request, its prompt cut to --max-log-len; with
--enable-log-outputs also one per finished request: each choice's text and token ids (a stream's too, whole,
once it ends)."""

from __future__ import annotations

import logging
from typing import Any

from meshserve.outputs import RequestOutput
from meshserve.sampling import SamplingParams

logger = logging.getLogger("meshserve.requests")


def _cut(value, max_len: int | None):
    return value if max_len is None else value[:max_len]


def prompt_parts(prompt: Any) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of an engine prompt, None for the one it does not carry."""
    text = prompt if isinstance(prompt, str) else prompt.get("prompt") if isinstance(prompt, dict) else None
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
    if isinstance(prompt, list):
        ids = prompt
    return text, None if ids is None else list(ids)


def log_request(request_id: str, parts: list[tuple[str | None, list[int] | None]], params: SamplingParams,
                max_len: int | None) -> None:
    """Each prompt (text and token ids, each cut to max_len characters / ids) with the sampling parameters."""
    for i, (text, ids) in enumerate(parts):
        logger.info("Received request %s-%d: prompt: %r, params: %s, prompt_token_ids: %s", request_id, i,
                    _cut(text, max_len) if text is not None else None, params,
                    _cut(ids, max_len) if ids is not None else None)


class OutputLog:
    """Collects one request's DELTA outputs; logs each choice once the request finishes."""

    def __init__(self, max_len: int | None, name: str | None = None):
        self.max_len = max_len
        self.name = name  # the request's name in the logs (when None: its engine id, random suffix and all)
        self.texts: dict[int, str] = {}
        self.token_ids: dict[int, list[int]] = {}

    def __call__(self, out: RequestOutput) -> None:
        for c in out.outputs:
            self.texts[c.index] = self.texts.get(c.index, "") + c.text
            self.token_ids.setdefault(c.index, []).extend(c.token_ids)
            if c.finish_reason is not None:
                logger.info("Generated response %s (choice %d): output: %r, output_token_ids: %s, "
                            "finish_reason: %s", self.name or out.request_id, c.index,
                            _cut(self.texts[c.index], self.max_len),
                            _cut(self.token_ids[c.index], self.max_len), c.finish_reason)
