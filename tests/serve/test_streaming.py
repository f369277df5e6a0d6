"""Server-sent events: each event is one line for any line reader, whatever characters the text holds."""

from __future__ import annotations

import json

from meshserve.serve.protocol import CompletionChoice, CompletionChunk
from meshserve.serve.streaming import sse_event

# JSON may carry these raw; Python's splitlines (httpx's aiter_lines, our load generators) breaks lines on them
TRICKY = "a\u2028b\u0085c\u2029d\ne\rf\x1cg"


def _one_event(event: str) -> dict:
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1  # no reader can split it
    return json.loads(event[len("data: "):])


def test_dict_payload_keeps_text_and_stays_one_line():
    assert _one_event(sse_event({"text": TRICKY}))["text"] == TRICKY


def test_model_payload_keeps_text_and_stays_one_line():
    chunk = CompletionChunk(id="x", model="m", choices=[CompletionChoice(index=0, text=TRICKY)])
    assert _one_event(sse_event(chunk))["choices"][0]["text"] == TRICKY
