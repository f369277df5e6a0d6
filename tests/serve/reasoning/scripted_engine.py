"""A served model whose output is scripted: the tiny engine answers everything (admission, stats, the
tokenizer thread) except generation, which plays given token ids back as DELTA outputs, a chosen number of
tokens per step, each step's text what decoding the ids so far adds (as the engine's detokenizer streams it).
The sampling params of each request are kept, to see what a request asked of the engine."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

from meshserve.outputs import CompletionOutput, RequestOutput


class ScriptedLLM:
    def __init__(self, real, tokenizer):
        self._real = real
        self.tokenizer = tokenizer
        self.script: list[int] = []
        self.tokens_per_step = 1
        self.finish_reason = "stop"
        self.params: list[Any] = []  # each request's SamplingParams, in arrival order

    def __getattr__(self, name):
        return getattr(self._real, name)

    def say(self, text: str, tokens_per_step: int | list[int] = 1, finish_reason: str = "stop") -> list[int]:
        """Script the next outputs: the text's tokens (tags as their single tokens where the vocabulary has them),
        tokens_per_step in every step, or a list of step sizes (repeated to the end)."""
        self.script = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        self.tokens_per_step, self.finish_reason = tokens_per_step, finish_reason
        return self.script

    def _bounds(self) -> list[int]:
        sizes = self.tokens_per_step if isinstance(self.tokens_per_step, list) else [self.tokens_per_step]
        bounds, k = [0], 0
        while bounds[-1] < len(self.script) or len(bounds) == 1:
            bounds.append(min(bounds[-1] + sizes[k % len(sizes)], max(len(self.script), 1)))
            k += 1
        return bounds

    async def generate(self, prompt, params, request_id, *args, **kwargs):
        self.params.append(params)
        prompt_ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else list(prompt)
        ids, sent = self.script, ""
        bounds = self._bounds()
        for start, end in itertools.pairwise(bounds):
            chunk = ids[start:end]
            text = self.tokenizer.decode(ids[:end], skip_special_tokens=params.skip_special_tokens)
            last = end >= len(ids)
            if not last:  # a character cut between tokens waits, as the engine's detokenizer holds it back
                text = text.rstrip("\ufffd")
            out = CompletionOutput(index=0, text=text[len(sent):], token_ids=chunk,
                                   finish_reason=self.finish_reason if last else None)
            sent = text
            yield RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=list(prompt_ids),
                                outputs=[out], finished=last)
            await asyncio.sleep(0)


@contextlib.contextmanager
def scripted_server(real, tokenizer, config) -> Iterator[tuple[str, ScriptedLLM]]:
    """A server (ServeConfig config) over a ScriptedLLM of the real engine with this tokenizer: (its URL, the
    engine to script), stopped on exit."""
    from tests.serve.conftest import start_server

    engine = ScriptedLLM(real, tokenizer)
    srv = start_server(engine, config)
    try:
        yield srv.base_url, engine
    finally:
        srv.stop()
