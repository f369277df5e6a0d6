"""What the completions and chat handlers share: model check, usage, per-choice stream bookkeeping."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from meshserve.errors import ModelNotFoundError
from meshserve.outputs import CompletionOutput, RequestOutput
from meshserve.serve.config import ServeConfig
from meshserve.serve.engine_client import EngineRequest, merge_requests
from meshserve.serve.metrics import RequestTracker
from meshserve.serve.protocol import PromptTokensDetails, UsageInfo


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(config: ServeConfig, model: str | None) -> str:
    """The name to answer with; 404 for a model this server does not serve."""
    if model is None or model in config.served_model_names:
        return config.model_name if model is None else model
    raise ModelNotFoundError(model)


def server_defaults(req, config: ServeConfig) -> None:
    """The server's defaults for what a request leaves unset: --return-tokens-as-token-ids, and
    --default-chat-template-kwargs under its own chat_template_kwargs (so the reasoning parser sees them too)."""
    fields = type(req).model_fields
    if (config.return_tokens_as_token_ids and "return_tokens_as_token_ids" in fields
            and "return_tokens_as_token_ids" not in req.model_fields_set):
        req.return_tokens_as_token_ids = True
    if config.default_chat_template_kwargs and "chat_template_kwargs" in fields:
        req.chat_template_kwargs = {**config.default_chat_template_kwargs, **(req.chat_template_kwargs or {})}


def request_chat_template(req) -> str | None:
    """The chat template a request brings itself (vLLM's chat_template field, or in chat_template_kwargs)."""
    return req.chat_template or (req.chat_template_kwargs or {}).get("chat_template")


def usage_of(outputs: list[RequestOutput]) -> UsageInfo:
    """Exact token counts: each prompt once, every generated token of every choice."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def stream_usage_flags(req, config: ServeConfig) -> tuple[bool, bool]:
    """(a usage chunk at the end, usage in every chunk): vLLM's rule, continuous_usage_stats needs include_usage
    (--enable-force-include-usage stands for it)."""
    opts = req.stream_options
    include = config.enable_force_include_usage or bool(opts and opts.include_usage)
    return include, include and bool(opts and opts.continuous_usage_stats)


def choice_usage(prompt_tokens: int, out: RequestOutput | None, index: int) -> UsageInfo:
    """vLLM's continuous usage of one streamed choice: its prompt, and the tokens it generated so far (out is the
    request's output accumulated up to this chunk; None before the first step)."""
    completion = next((len(c.token_ids) for c in out.outputs if c.index == index), 0) if out is not None else 0
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                     total_tokens=prompt_tokens + completion)


def accumulate(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a DELTA output into the request's output so far (texts, tokens and logprobs appended)."""
    if acc is None:
        acc = RequestOutput(request_id=delta.request_id, prompt=delta.prompt,
                            prompt_token_ids=delta.prompt_token_ids, outputs=[], finished=False,
                            num_cached_tokens=delta.num_cached_tokens, metrics=delta.metrics)
    acc.finished = delta.finished
    acc.num_cached_tokens = delta.num_cached_tokens
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    by_index = {c.index: c for c in acc.outputs}
    for d in delta.outputs:
        c = by_index.get(d.index)
        if c is None:
            c = by_index[d.index] = CompletionOutput(index=d.index, text="", token_ids=[],
                                                     logprobs=[] if d.logprobs is not None else None)
            acc.outputs.append(c)
            acc.outputs.sort(key=lambda o: o.index)
        c.text += d.text
        c.token_ids.extend(d.token_ids)
        if d.logprobs is not None and c.logprobs is not None:
            c.logprobs.extend(d.logprobs)
        c.cumulative_logprob = d.cumulative_logprob
        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    return acc


async def collect_outputs(requests: list[EngineRequest], tracker: RequestTracker) -> list[RequestOutput]:
    """Each request's whole output (a response that is not streamed), every step observed by the tracker;
    on failure or cancellation the tracker records the error or abort. The caller closes the requests."""
    finals: dict[int, RequestOutput] = {}
    try:
        async for i, out in merge_requests(requests):
            tracker.observe(i, out)
            finals[i] = accumulate(finals.get(i), out)
    except BaseException as e:
        tracker.finish("abort" if isinstance(e, asyncio.CancelledError) else "error")
        raise
    return [finals[i] for i in range(len(requests))]


@dataclass
class ChoiceDelta:
    """What one choice gained since it was last sent."""

    text: str
    token_ids: list[int]
    token_start: int  # index in the choice's token_ids of token_ids[0]
    finish_reason: str | None
    stop_reason: int | str | None
    first: bool  # nothing was sent for this choice before


@dataclass
class StreamState:
    """Per (prompt, choice) counts of what has been sent, so each DELTA output becomes at most one chunk."""

    tokens_seen: dict[tuple[int, int], int] = field(default_factory=dict)
    sent: set[tuple[int, int]] = field(default_factory=set)
    finished: set[tuple[int, int]] = field(default_factory=set)
    # a model without a tokenizer has no text: every new token still gets its chunk (token-id clients)
    every_token: bool = False

    def delta(self, prompt_index: int, c: CompletionOutput, need_tokens: bool) -> ChoiceDelta | None:
        """The choice's new text/tokens (c is a DELTA output), or None when there is nothing worth a chunk.

        need_tokens: emit a chunk for new tokens even if their text is held back (logprobs were asked).
        """
        key = (prompt_index, c.index)
        if key in self.finished:
            return None
        k0 = self.tokens_seen.get(key, 0)
        self.tokens_seen[key] = k0 + len(c.token_ids)
        if not c.text and not c.finish_reason and not ((need_tokens or self.every_token) and c.token_ids):
            return None
        first = key not in self.sent
        self.sent.add(key)
        if c.finish_reason:
            self.finished.add(key)
        return ChoiceDelta(c.text, list(c.token_ids), k0, c.finish_reason, c.stop_reason, first)
