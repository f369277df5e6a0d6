"""POST /v1/completions: one engine request per prompt, n choices each, streamed or whole."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from starlette.responses import Response

from meshserve.outputs import CompletionOutput, RequestOutput
from meshserve.serve.chunk_encoding import ChunkEncoder
from meshserve.serve.config import ServeConfig
from meshserve.serve.engine_client import EngineClient, EngineRequest, merge_requests
from meshserve.serve.logprobs import completion_logprobs, prompt_logprobs, trim_position
from meshserve.serve.metrics import RequestTracker, ServerMetrics, outcome_of
from meshserve.serve.protocol import (
    CompletionChoice,
    CompletionResponseChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from meshserve.serve.sampling_params import completion_sampling_params
from meshserve.serve.serving_common import (
    ChoiceDelta,
    StreamState,
    accumulate,
    check_model,
    choice_usage,
    collect_outputs,
    server_defaults,
    stream_usage_flags,
    usage_of,
)
from meshserve.serve.streaming import SSE_DONE, SSEResponse, sse_error, sse_event
from meshserve.serve.structured_request import import_grammar_backend

logger = logging.getLogger(__name__)


class _Echo:
    """The prompt as it is echoed back: its text ("" with return_token_ids, as vLLM: prompt_token_ids carry it)
    and, with logprobs, its tokens' texts."""

    def __init__(self, text: str, token_texts: list[str] | None):
        self.text = text
        self.token_texts = token_texts


class CompletionService:
    def __init__(self, client: EngineClient, config: ServeConfig, metrics: ServerMetrics):
        self.client = client
        self.config = config
        self.metrics = metrics

    async def create(self, req: CompletionRequest) -> Response | CompletionResponse:
        tracker = self.metrics.track()
        try:
            model = check_model(self.config, req.model)
            server_defaults(req, self.config)
            await import_grammar_backend(req)  # off the event loop: its first import takes ~1.5 s
            params = completion_sampling_params(req, self.client.generation_defaults)
            tracker.ttft_target_s, tracker.tpot_target_s = self.client.slo_targets(req.slo)
            prompts = req.prompts()
            request_id = req.response_id("cmpl")
            engine_prompts = [p if isinstance(p, str) and req.add_special_tokens  # the engine tokenizes it
                              else {"prompt": p, "prompt_token_ids": await self.client.tokenize(p, False)}
                              if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts]
            requests = await self.client.start(engine_prompts, params, request_id, req.priority, req.slo,
                                               tracker.arrival_monotonic)
        except BaseException as e:
            tracker.fail(e)
            raise
        try:
            echoes = await self._echoes(req, requests) if req.echo else None
        except BaseException as e:
            await _close(requests)
            tracker.fail(e)  # a client gone meanwhile (cancelled) is an abort, not an error
            raise
        if req.stream:
            return SSEResponse(self._stream(req, model, request_id, requests, echoes, tracker))
        return await self._whole(req, model, request_id, requests, echoes, tracker)

    async def _echoes(self, req: CompletionRequest, requests: list[EngineRequest]) -> list[_Echo]:
        echoes = []
        for r in requests:
            ids = r.first.prompt_token_ids
            # the prompt's text, when the engine kept it (a token-id or truncated prompt has none: decoded)
            text = "" if req.return_token_ids else \
                r.first.prompt if r.first.prompt is not None else await self.client.decode(ids)
            texts = await self.client.decode_each(ids) if req.logprobs is not None else None
            echoes.append(_Echo(text, texts))
        return echoes

    # -- whole response --------------------------------------------------------------------------
    async def _whole(self, req, model, request_id, requests, echoes, tracker: RequestTracker) -> CompletionResponse:
        try:
            outputs = await collect_outputs(requests, tracker)
        finally:
            await _close(requests)
        tracker.finish(outcome_of(outputs))
        choices = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                choices.append(self._choice(req, i, out, c, echoes[i] if echoes else None))
        handle = outputs[0].kv_transfer_params if len(outputs) == 1 else None
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of(outputs),
                                  kv_transfer_params=handle)

    def _choice(self, req: CompletionRequest, i: int, out: RequestOutput, c: CompletionOutput,
                echo: _Echo | None) -> CompletionResponseChoice:
        generated, positions = ([], []) if req.echo_only else (c.token_ids, list(c.logprobs or []))
        text = (echo.text if echo else "") + ("" if req.echo_only else c.text)
        logprobs = None
        as_ids = req.return_tokens_as_token_ids
        if req.logprobs is not None:
            if echo:
                logprobs = _echoed_logprobs(req, out, generated, positions, echo)
            else:
                logprobs = completion_logprobs(c.token_ids, list(c.logprobs or []), as_ids=as_ids)
        scored = (prompt_logprobs(out.prompt_token_ids, out.prompt_logprobs, req.prompt_logprobs, as_ids)
                  if req.prompt_logprobs is not None else None)
        return CompletionResponseChoice(index=i * req.n + c.index, text=text, logprobs=logprobs,
                                        finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                        token_ids=list(c.token_ids) if req.return_token_ids else None,
                                        prompt_token_ids=list(out.prompt_token_ids) if req.return_token_ids
                                        else None, prompt_logprobs=scored)

    # -- stream ----------------------------------------------------------------------------------
    async def _stream(self, req, model, request_id, requests, echoes,
                      tracker: RequestTracker) -> AsyncIterator[str | bytes]:
        state = StreamState(every_token=not self.client.has_tokenizer)
        finals: dict[int, RequestOutput] = {}
        want_lp = req.logprobs is not None
        want_tokens = want_lp or req.return_token_ids  # a chunk for every new token, none held back
        include_usage, continuous_usage = stream_usage_flags(req, self.config)
        fast = ChunkEncoder(request_id, model, "text_completion")  # chunks without logprobs skip pydantic
        # per choice, the length of the logprob token texts sent so far: a chunk's text_offset continues from it
        # (as vLLM's do, and as the whole answer's count from the choice's start)
        offsets: dict[int, int] = {}
        outcome = "abort"
        try:
            async for i, out in merge_requests(requests):
                tracker.observe(i, out)
                finals[i] = accumulate(finals.get(i), out)
                for c in out.outputs:
                    d = state.delta(i, c, need_tokens=want_tokens)
                    if d is None:
                        continue
                    index = i * req.n + c.index
                    echoing = echoes is not None and (d.first or req.echo_only)
                    if not want_tokens and not continuous_usage and not echoing:
                        yield fast.completion(index, d.text, d.finish_reason, d.stop_reason)
                        continue
                    choice = self._chunk_choice(req, i, finals[i], c, d, echoes[i] if echoes else None,
                                                offsets.get(index, 0))
                    if choice.logprobs is not None:
                        offsets[index] = offsets.get(index, 0) + sum(map(len, choice.logprobs.tokens))
                    usage = (choice_usage(len(finals[i].prompt_token_ids), finals[i], c.index)
                             if continuous_usage else None)
                    yield sse_event(CompletionChunk(id=request_id, model=model, choices=[choice], usage=usage))
            outputs = [finals[i] for i in range(len(requests))]
            outcome = outcome_of(outputs)
            if include_usage:
                yield sse_event(CompletionChunk(id=request_id, model=model, choices=[],
                                                usage=usage_of(outputs)))
            yield SSE_DONE
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
            outcome = "error"
            yield sse_error(e)
            yield SSE_DONE
        finally:
            tracker.finish(outcome)
            await _close(requests)

    def _chunk_choice(self, req: CompletionRequest, i: int, out: RequestOutput, c: CompletionOutput,
                      d: ChoiceDelta, echo: _Echo | None, text_offset: int = 0) -> CompletionChoice:
        """out: the request's output so far (for the echoed prompt); c: this step's delta of one choice;
        text_offset: where this chunk's logprob tokens start in the choice's text."""
        # echo with max_tokens 0: the generated token's text and logprobs are not sent (its id is, as vLLM's)
        text, generated = ("", []) if req.echo_only else (d.text, d.token_ids)
        positions = [] if req.echo_only else list(c.logprobs or [])
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(generated, positions, text_offset=text_offset,
                                           as_ids=req.return_tokens_as_token_ids)
        if d.first and echo is not None:
            text = echo.text + text
            if logprobs is not None:
                logprobs = _echoed_logprobs(req, out, generated, positions, echo)
        first_ids = d.first and req.return_token_ids  # vLLM: the prompt's ids in each choice's first chunk
        return CompletionChoice(index=i * req.n + c.index, text=text, logprobs=logprobs,
                                finish_reason=d.finish_reason, stop_reason=d.stop_reason,
                                token_ids=d.token_ids if req.return_token_ids else None,
                                prompt_token_ids=list(out.prompt_token_ids) if first_ids else None)


def _echoed_logprobs(req: CompletionRequest, out: RequestOutput, token_ids: list[int], positions: list,
                     echo: _Echo) -> CompletionLogprobs:
    """Logprobs of the echoed prompt (its prompt logprobs, None where not computed, and its token texts)
    followed by those of token_ids, generated at positions (their texts come from their logprobs). The prompt's
    alternatives are trimmed to logprobs' k (prompt_logprobs may have asked the engine for more)."""
    prompt_positions = list(out.prompt_logprobs or [None] * len(out.prompt_token_ids))
    k = req.logprobs or 0
    prompt_positions = [trim_position(p, t, k) for p, t in zip(prompt_positions, out.prompt_token_ids)]
    return completion_logprobs(out.prompt_token_ids + token_ids, prompt_positions + positions,
                               (echo.token_texts or []) + [""] * len(token_ids),
                               as_ids=req.return_tokens_as_token_ids)


async def _close(requests: list[EngineRequest]) -> None:
    for r in requests:
        try:
            await r.aclose()
        except Exception:
            logger.debug("closing an engine request failed", exc_info=True)
