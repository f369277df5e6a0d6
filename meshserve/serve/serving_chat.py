"""POST /v1/chat/completions: messages rendered with the model's chat template, n choices."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from starlette.responses import Response

from meshserve.outputs import CompletionOutput, RequestOutput
from meshserve.serve.config import ServeConfig
from meshserve.serve.engine_client import EngineClient, EngineRequest
from meshserve.serve.logprobs import chat_logprobs
from meshserve.serve.metrics import RequestTracker, ServerMetrics, outcome_of
from meshserve.serve.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
)
from meshserve.serve.sampling_params import chat_sampling_params
from meshserve.serve.serving_common import (
    ChoiceDelta,
    StreamState,
    accumulate,
    check_model,
    random_id,
    usage_of,
)
from meshserve.serve.streaming import SSE_DONE, SSEResponse, sse_error, sse_event

logger = logging.getLogger(__name__)


def _chunk_event(chunk: ChatCompletionChunk) -> str:
    # OpenAI's deltas omit the fields they do not carry ({"content": "x"}, or {} at the end)
    body = chunk.model_dump(mode="json")
    for choice in body["choices"]:
        choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return sse_event(body)


class ChatService:
    def __init__(self, client: EngineClient, config: ServeConfig, metrics: ServerMetrics):
        self.client = client
        self.config = config
        self.metrics = metrics

    async def create(self, req: ChatCompletionRequest) -> Response | ChatCompletionResponse:
        tracker = self.metrics.track()
        try:
            model = check_model(self.config, req.model)
            params = chat_sampling_params(req, self.client.generation_defaults)
            tracker.ttft_target_s, tracker.tpot_target_s = self.client.slo_targets(req.slo)
            self.client.check_admission()  # before spending a template render on a request we refuse
            messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                        for m in req.messages]
            prompt_ids = await self.client.render_chat(messages, req.add_generation_prompt,
                                                       req.chat_template_kwargs)
            request_id = random_id("chatcmpl")
            requests = await self.client.start([{"prompt_token_ids": prompt_ids}], params, request_id,
                                               req.priority, req.slo, tracker.arrival_monotonic)
        except BaseException as e:
            tracker.fail(e)
            raise
        if req.stream:
            return SSEResponse(self._stream(req, model, request_id, requests[0], tracker))
        return await self._whole(req, model, request_id, requests[0], tracker)

    def _logprobs(self, req: ChatCompletionRequest, token_ids: list[int], positions) -> ChatChoiceLogprobs | None:
        if not req.logprobs:
            return None
        return ChatChoiceLogprobs(content=chat_logprobs(token_ids, list(positions or []), req.top_logprobs or 0))

    # -- whole response --------------------------------------------------------------------------
    async def _whole(self, req, model, request_id, request: EngineRequest,
                     tracker: RequestTracker) -> ChatCompletionResponse:
        final: RequestOutput | None = None
        try:
            async for out in request:
                tracker.observe(0, out)
                final = accumulate(final, out)
        except BaseException as e:
            tracker.finish("abort" if isinstance(e, asyncio.CancelledError) else "error")
            raise
        finally:
            await request.aclose()
        assert final is not None
        tracker.finish(outcome_of([final]))
        choices = [self._choice(req, c) for c in final.outputs]
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of([final]))

    def _choice(self, req: ChatCompletionRequest, c: CompletionOutput) -> ChatChoice:
        return ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                          logprobs=self._logprobs(req, c.token_ids, c.logprobs),
                          finish_reason=c.finish_reason, stop_reason=c.stop_reason)

    # -- stream ----------------------------------------------------------------------------------
    async def _stream(self, req, model, request_id, request: EngineRequest,
                      tracker: RequestTracker) -> AsyncIterator[str]:
        state = StreamState(every_token=not self.client.has_tokenizer)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        final: RequestOutput | None = None
        outcome = "abort"
        try:
            for i in range(req.n):  # the role comes first, in a chunk of its own, as OpenAI sends it
                yield _chunk_event(ChatCompletionChunk(id=request_id, model=model, choices=[
                    ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))]))
            async for out in request:
                tracker.observe(0, out)
                final = accumulate(final, out)
                for c in out.outputs:
                    d = state.delta(0, c, need_tokens=req.logprobs)
                    if d is not None:
                        yield _chunk_event(ChatCompletionChunk(id=request_id, model=model,
                                                               choices=[self._chunk_choice(req, c, d)]))
            assert final is not None
            outcome = outcome_of([final])
            if include_usage:
                yield sse_event(ChatCompletionChunk(id=request_id, model=model, choices=[],
                                                    usage=usage_of([final])))
            yield SSE_DONE
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
            outcome = "error"
            yield sse_error(e)
            yield SSE_DONE
        finally:
            tracker.finish(outcome)
            await request.aclose()

    def _chunk_choice(self, req: ChatCompletionRequest, c: CompletionOutput, d: ChoiceDelta) -> ChatChunkChoice:
        positions = list(c.logprobs or [])  # c is this step's delta
        return ChatChunkChoice(index=c.index, delta=ChatDelta(content=d.text or None),
                               logprobs=self._logprobs(req, d.token_ids, positions),
                               finish_reason=d.finish_reason, stop_reason=d.stop_reason)
