"""EngineClient: what the HTTP handlers need from the AsyncLLM, in one place.

Admission (the waiting-queue bound), starting requests so that their validation errors surface before
any response byte is sent, and every tokenizer call. Tokenizer calls go through `allm.run_tokenizer`, which
runs them on one thread only (a Rust fast tokenizer used from two threads at once can fail, "Already
borrowed"); detokenization uses the output processor's own copy of the tokenizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from meshserve.engine.async_engine import AsyncLLM
from meshserve.engine.chat_template import render_chat, render_chat_text
from meshserve.engine.output_processor import token_texts_in_context
from meshserve.errors import InvalidArgumentError, ServerOverloadedError, ServiceLevelError
from meshserve.outputs import RequestOutput
from meshserve.sampling import SamplingParams
from meshserve.engine.chat_content_format import resolve_content_format, with_content_format
from meshserve.serve.config import ServeConfig
from meshserve.serve.frontend_load import FrontendLoad
from meshserve.serve.log_requests import OutputLog, log_request, prompt_parts
from meshserve.serve.protocol import ServiceLevel

logger = logging.getLogger(__name__)

class EngineRequest:
    """One engine request already admitted and started: its first output and the rest of its stream.

    Iterating yields every cumulative output, the first included. `aclose()` aborts the request if it
    has not finished (its KV blocks are freed on the engine's next step).
    """

    def __init__(self, gen: AsyncIterator[RequestOutput], first: RequestOutput,
                 observer: Callable[[RequestOutput], None] | None = None):
        self._gen = gen
        self.first = first
        self.observer = observer  # sees every output (--enable-log-outputs)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        if self.observer is not None:
            self.observer(self.first)
        yield self.first
        if self.first.finished:
            return
        async for out in self._gen:
            if self.observer is not None:
                self.observer(out)
            yield out

    async def aclose(self) -> None:
        await self._gen.aclose()  # type: ignore[attr-defined]


class EngineClient:
    """Thin async facade over AsyncLLM for the server."""

    def __init__(self, allm: AsyncLLM, config: ServeConfig):
        self.allm = allm
        self.config = config
        self._num_starting = 0  # requests submitted but not yet seen by the engine's queue counter
        self._content_format: str | None = None  # string | openai, once the first chat is rendered
        self.load = FrontendLoad()
        allm.frontend_delay_s = self.load.loop_lag.value  # its own TTFT check sees this loop's lag too

    # -- state -----------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self.allm.is_running

    @property
    def max_model_len(self) -> int:
        return self.allm.max_model_len

    @property
    def has_tokenizer(self) -> bool:
        return self.allm.tokenizer is not None

    def queue_depth(self) -> int:
        """Requests waiting: the engine's count (which includes requests sent to the core and not yet taken)
        or, if larger, the requests this server is still starting (before their first output). Both read
        without a round trip to the core; the larger, not the sum, since a starting request is in both."""
        return max(self.allm.num_waiting, self._num_starting)

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """The model's sampling defaults (generation_config.json) for the fields a request leaves unset."""
        return self.allm.core_client.info.generation_defaults

    def slo_targets(self, slo: ServiceLevel | None) -> tuple[float | None, float | None]:
        """(TTFT, TPOT) targets in seconds that apply to a request: its own, else the server's."""
        info = self.allm.core_client.info
        ttft = slo.ttft_ms / 1e3 if slo is not None and slo.ttft_ms else info.slo_ttft_s
        tpot = slo.tpot_ms / 1e3 if slo is not None and slo.tpot_ms else info.slo_tpot_s
        return ttft, tpot

    def check_admission(self) -> None:
        if self.queue_depth() >= self.config.max_queue_len:
            raise ServerOverloadedError(
                f"the server's waiting queue is full ({self.config.max_queue_len} requests); retry later",
                retry_after_s=self.config.retry_after_s)

    def frontend_admission_error(self) -> ServiceLevelError | None:
        """A 429 for a request arriving now, before its body is read, if this process's own delay (input
        backlog, event-loop lag) plus the engine's queue wait already breaks the server's TTFT target."""
        target = self.allm.core_client.info.slo_ttft_s
        if target is None:
            return None
        predicted = self.load.input_delay.value() + self.allm.predicted_ttft_s(0)  # that counts the loop lag
        if self.allm.admission_margin.admits(predicted, target):
            return None
        return ServiceLevelError(f"the server is at capacity: predicted time to first token {predicted:.2f} s, "
                                 f"target {target:.2f} s; retry later",
                                 retry_after_s=max(1, math.ceil(predicted - target)))

    def stats(self) -> tuple[dict[str, Any], float] | None:
        """The core's counters as of its last step and their age in seconds (never waits on the core),
        or None when the engine is gone."""
        if not self.is_running:
            return None
        return self.allm.stats_snapshot()

    # -- tokenizer -------------------------------------------------------------------------------
    def _require_tokenizer(self, what: str):
        tok = self.allm.tokenizer
        if tok is None:
            raise InvalidArgumentError(f"this model has no tokenizer, so {what} is unavailable",
                                       param="messages" if what == "chat" else "prompt")
        return tok

    async def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                          template_kwargs: dict[str, Any] | None, tools: list[dict[str, Any]] | None = None,
                          continue_final_message: bool = False, request_template: str | None = None,
                          add_special_tokens: bool = False) -> list[int]:
        """Token ids of a conversation rendered with the chat template (--chat-template, else the model's, as
        LLM.chat does); the template renders the tools, if given, its own way. add_special_tokens (vLLM's chat
        field): the rendered text is tokenized with the tokenizer's special tokens added, as vLLM does (a BOS
        the template wrote itself is then doubled)."""
        tok = self._require_tokenizer("chat")
        template = self.config.chat_template
        if request_template is not None:  # vLLM's rule: a request's own Jinja only where the server trusts it
            if not self.config.trust_request_chat_template:
                raise InvalidArgumentError("Chat template is passed with request, but --trust-request-chat-template "
                                           "is not set. Refused request with untrusted chat template.",
                                           param="chat_template")  # vLLM's words
            content_format = resolve_content_format(self.config.chat_template_content_format, request_template)
            template = request_template
        else:
            if self._content_format is None:  # the server's template is fixed: read it once
                self._content_format = resolve_content_format(self.config.chat_template_content_format,
                                                              template or getattr(tok, "chat_template", None))
            content_format = self._content_format
        messages = with_content_format(messages, content_format)
        render = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
                  "tools": tools, "chat_template": template, "template_kwargs": template_kwargs}
        if add_special_tokens:  # vLLM renders the text, then tokenizes it with the request's add_special_tokens
            return await self.allm.run_tokenizer(lambda: list(tok(render_chat_text(tok, messages, **render),
                                                                  add_special_tokens=True).input_ids))
        return await self.allm.run_tokenizer(lambda: render_chat(tok, messages, **render))

    async def _log_parts(self, prompts: list[Any]) -> list[tuple[str | None, list[int] | None]]:
        """Each prompt's text and token ids for --enable-log-requests, the one a prompt lacks (a chat's rendered
        ids have no text, a text prompt no ids yet) filled in by the tokenizer, as vLLM logs both."""
        parts = [prompt_parts(p) for p in prompts]
        tok = self.allm.tokenizer
        if tok is None or all(text is not None and ids is not None for text, ids in parts):
            return parts

        def fill(text: str | None, ids: list[int] | None) -> tuple[str | None, list[int] | None]:
            if text is None and ids is not None:
                return tok.decode(ids), ids
            if ids is None and text is not None:
                return text, list(tok(text).input_ids)
            return text, ids

        return await self.allm.run_tokenizer(lambda: [fill(*part) for part in parts])

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tok = self._require_tokenizer("prompt")
        return await self.allm.run_tokenizer(lambda: list(tok(text, add_special_tokens=add_special_tokens).input_ids))

    async def token_strs(self, token_ids: list[int]) -> list[str]:
        tok = self._require_tokenizer("prompt")
        return await self.allm.run_tokenizer(lambda: [str(t) for t in tok.convert_ids_to_tokens(token_ids)])

    async def decode_each(self, token_ids: list[int]) -> list[str]:
        """Each token's text in the sequence (for echoed prompt logprobs): as the engine's logprob texts, a
        token that ends inside a multi-byte character reads "" and the one that completes it reads all of it."""
        tok = self.allm.tokenizer
        if tok is None:
            return ["" for _ in token_ids]
        return await self.allm.run_tokenizer(lambda: token_texts_in_context(tok, token_ids))

    async def decode(self, token_ids: list[int]) -> str:
        tok = self.allm.tokenizer
        if tok is None:
            return ""
        return await self.allm.run_tokenizer(lambda: tok.decode(token_ids))

    # -- requests --------------------------------------------------------------------------------
    def _check_logprobs(self, params: SamplingParams) -> None:
        """--max-logprobs: a request asking for more alternatives per position is a 400 (as vLLM)."""
        limit = self.config.max_logprobs
        for name, asked in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if asked is not None and asked > limit:
                raise InvalidArgumentError(f"{name}: {asked} requested, the server returns at most {limit} "
                                           "(--max-logprobs)", param=name)

    async def start(self, prompts: list[Any], params: SamplingParams, request_id: str, priority: int = 0,
                    slo: ServiceLevel | None = None, arrival_time: float | None = None) -> list[EngineRequest]:
        """Admit and start one engine request per prompt; wait for each one's first output.

        Errors (invalid prompt, prompt too long, full queue, a time-to-first-token target that cannot be
        met) are raised here, before the caller has sent anything, so they get a proper status code. If
        one prompt fails, the others are aborted.
        """
        self.check_admission()
        self._check_logprobs(params)
        if self.config.enable_log_requests:
            log_request(request_id, await self._log_parts(prompts), params, self.config.max_log_len)
        if arrival_time is not None:
            self.load.request_reached_handler(arrival_time)
        ttft = slo.ttft_ms / 1e3 if slo is not None and slo.ttft_ms else None
        tpot = slo.tpot_ms / 1e3 if slo is not None and slo.tpot_ms else None
        # the engine's id of each prompt: <response id>-<i> plus a random suffix (vLLM's assign_request_id), so
        # a client's request_id / X-Request-Id may name several requests in flight at once; the response keeps
        # the client's name, and logs name each prompt <response id>-<i> (as vLLM's, the external id)
        names = [f"{request_id}-{i}" for i in range(len(prompts))]
        gens = [self.allm.generate(p, params, f"{name}-{uuid.uuid4().hex[:8]}", priority, ttft, tpot,
                                   arrival_time) for name, p in zip(names, prompts)]
        tasks = [asyncio.ensure_future(g.__anext__()) for g in gens]
        self._num_starting += len(gens)
        try:
            firsts = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for g in gens:
                with contextlib.suppress(Exception):
                    await g.aclose()
            raise
        finally:
            self._num_starting -= len(gens)
        log_outputs = self.config.enable_log_requests and self.config.enable_log_outputs
        return [EngineRequest(g, first, OutputLog(self.config.max_log_len, name) if log_outputs else None)
                for g, first, name in zip(gens, firsts, names)]


async def merge_requests(requests: list[EngineRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come: yields (prompt index, output)."""
    if len(requests) == 1:
        async for out in requests[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, req: EngineRequest) -> None:
        try:
            async for out in req:
                await queue.put((i, out))
            await queue.put((i, done))
        except BaseException as e:
            await queue.put((i, e))
            raise

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
