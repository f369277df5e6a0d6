"""A streamed chat completion read back for the reasoning tests: its chunks' first choice, and a delta field joined."""

from __future__ import annotations

import json

import httpx

MESSAGES = [{"role": "user", "content": "Weather in Rome?"}]


def stream_choices(url: str, **body) -> list[dict]:
    """The stream's chunks' first choice (the role chunk left out); body overrides the model, the messages."""
    body = {"model": "m", "messages": MESSAGES, "stream": True, **body}
    choices = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("role") is None:
                    choices.append(chunk["choices"][0])
    return choices


def joined(choices: list[dict], field: str) -> str | None:
    return "".join(c["delta"].get(field) or "" for c in choices) or None
