"""POST /v1/chat/completions: messages rendered with the model's chat template, n choices."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from meshserve.outputs import CompletionOutput, RequestOutput
from meshserve.sampling import SamplingParams
from meshserve.serve.chunk_encoding import ChunkEncoder
from meshserve.serve.config import ServeConfig
from meshserve.serve.engine_client import EngineClient, EngineRequest
from meshserve.serve.logprobs import chat_logprobs, prompt_logprobs
from meshserve.serve.metrics import RequestTracker, ServerMetrics, outcome_of
from meshserve.serve.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessage,
    ChatResponseMessage,
)
from meshserve.serve.reasoning.chat import ReasoningPlan, plan_reasoning, server_reasoning_parser
from meshserve.serve.sampling_params import chat_sampling_params
from meshserve.serve.serving_common import (
    ChoiceDelta,
    StreamState,
    accumulate,
    check_model,
    choice_usage,
    collect_outputs,
    request_chat_template,
    server_defaults,
    stream_usage_flags,
    usage_of,
)
from meshserve.serve.streaming import SSE_DONE, SSEResponse, sse_error, sse_event
from meshserve.serve.structured_request import import_grammar_backend
from meshserve.serve.tool_call_stream import ToolCallStream
from meshserve.serve.tool_calls import ToolPlan, plan_tools, template_messages

logger = logging.getLogger(__name__)


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _chunk_event(chunk: ChatCompletionChunk) -> str:
    # OpenAI's deltas omit the fields they do not carry ({"content": "x"}, or {} at the end), down into
    # tool calls: the SDK's accumulator takes a present "type": null as the call's new type
    body = chunk.model_dump(mode="json")
    for choice in body["choices"]:
        choice["delta"] = _without_nulls(choice["delta"])
    return sse_event(body)


@dataclass
class ChatStart:
    """A chat request running on the engine: the model name to answer with, and how to read its output."""

    model: str
    request_id: str
    request: EngineRequest
    plan: ToolPlan
    params: SamplingParams  # as resolved (the model's defaults filled in)
    reasoning: ReasoningPlan | None  # how to split the output's reasoning from its answer (--reasoning-parser)

    def read(self, c: CompletionOutput) -> tuple[str | None, str | None, list]:
        """A whole choice's (reasoning, content, tool calls): the calls are read from the content alone."""
        thought, text = self.reasoning.split(c.text, c.token_ids) if self.reasoning else (None, c.text)
        content, calls = self.plan.extract(text) if text is not None else (None, [])
        return thought, content, calls


def conversation_of(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template reads them (template_messages), with an assistant turn's reasoning
    under both names (vLLM: reasoning, and reasoning_content that Qwen3's template reads)."""
    out = template_messages(messages)
    for m, msg in zip(messages, out):
        reasoning = m.reasoning if m.reasoning is not None else m.reasoning_content
        if reasoning is not None and m.role == "assistant":
            msg["reasoning"] = msg["reasoning_content"] = reasoning
    return out


def template_kwargs_of(req) -> dict[str, Any] | None:
    """The request's chat_template_kwargs, with its documents (vLLM's field) for RAG templates."""
    if getattr(req, "documents", None) is None:
        return req.chat_template_kwargs
    return {**(req.chat_template_kwargs or {}), "documents": req.documents}


class ChatService:
    def __init__(self, client: EngineClient, config: ServeConfig, metrics: ServerMetrics):
        self.client = client
        self.config = config
        self.metrics = metrics
        self.reasoning_parser = server_reasoning_parser(config, client)

    async def create(self, req: ChatCompletionRequest) -> Response | ChatCompletionResponse:
        tracker = self.metrics.track()
        try:
            started = await self.start(req, tracker, req.response_id("chatcmpl"))
        except BaseException as e:
            tracker.fail(e)
            raise
        if req.stream:
            return SSEResponse(self._stream(req, started, tracker))
        return await self._whole(req, started, tracker)

    async def start(self, req: ChatCompletionRequest, tracker: RequestTracker, request_id: str) -> ChatStart:
        """Check the request, render its conversation and start it on the engine (also /v1/responses' way
        in). Raises for a request that is refused; the caller reports that to the tracker."""
        model = check_model(self.config, req.model)
        server_defaults(req, self.config)
        await import_grammar_backend(req)  # off the event loop: its first import takes ~1.5 s
        plan = plan_tools(req, self.config)
        params = chat_sampling_params(req, self.client.generation_defaults, plan.constraint)
        if plan.mode == "auto" and plan.keeps_special_tokens:
            params.skip_special_tokens = False  # the parser's markers are special tokens
        tracker.ttft_target_s, tracker.tpot_target_s = self.client.slo_targets(req.slo)
        self.client.check_admission()  # before spending a template render on a request we refuse
        # --exclude-tools-when-tool-choice-none: the template does not see tools the model may not call
        tools = [] if plan.mode == "none" and self.config.exclude_tools_when_tool_choice_none else plan.tools
        prompt_ids = await self.client.render_chat(conversation_of(req.messages), req.add_generation_prompt,
                                                   template_kwargs_of(req), tools, req.continue_final_message,
                                                   request_template=request_chat_template(req),
                                                   add_special_tokens=req.add_special_tokens)
        reasoning = await plan_reasoning(self.reasoning_parser, req, prompt_ids, params, self.client)
        requests = await self.client.start([{"prompt_token_ids": prompt_ids}], params, request_id,
                                           req.priority, req.slo, tracker.arrival_monotonic)
        return ChatStart(model, request_id, requests[0], plan, params, reasoning)

    def _role(self, req: ChatCompletionRequest) -> str:
        """vLLM's rule: --response-role for a new turn, else the role of the message being continued."""
        return self.config.response_role if req.add_generation_prompt else req.messages[-1].role

    def _echo(self, req: ChatCompletionRequest) -> str:
        """vLLM's echo: the last message's text, when the answer continues that message's role (else "")."""
        last = req.messages[-1]
        return last.text() if req.echo and last.role == self._role(req) else ""

    def _sends_ids(self, req: ChatCompletionRequest) -> bool:
        """Whether each choice carries its generated ids (return_token_ids): the raw ids, whatever the parsers
        make of the text; but not with include_reasoning false on a server with a reasoning or auto-tool
        parser, whose ids would give the hidden reasoning away (vLLM's hide_stream_metadata, suppress_metadata)."""
        parsers = self.reasoning_parser is not None or bool(self.config.enable_auto_tool_choice
                                                           and self.config.tool_call_parser)
        return req.return_token_ids and not (parsers and not req.include_reasoning)

    def _logprobs(self, req: ChatCompletionRequest, token_ids: list[int], positions) -> ChatChoiceLogprobs | None:
        if not req.logprobs:
            return None
        return ChatChoiceLogprobs(content=chat_logprobs(token_ids, list(positions or []), req.top_logprobs or 0,
                                                        as_ids=req.return_tokens_as_token_ids))

    # -- whole response --------------------------------------------------------------------------
    async def _whole(self, req, started: ChatStart, tracker: RequestTracker) -> ChatCompletionResponse:
        request = started.request
        try:
            (final,) = await collect_outputs([request], tracker)
        finally:
            await request.aclose()
        tracker.finish(outcome_of([final]))
        choices = [self._choice(req, c, started) for c in final.outputs]
        if echo := self._echo(req):
            for choice in choices:
                choice.message.content = echo + (choice.message.content or "")
        scored = (prompt_logprobs(final.prompt_token_ids, final.prompt_logprobs, req.prompt_logprobs,
                                  req.return_tokens_as_token_ids) if req.prompt_logprobs is not None else None)
        prompt_ids = list(final.prompt_token_ids) if req.return_token_ids else None
        return ChatCompletionResponse(id=started.request_id, model=started.model, choices=choices,
                                      usage=usage_of([final]), prompt_logprobs=scored, prompt_token_ids=prompt_ids,
                                      kv_transfer_params=final.kv_transfer_params)

    def _choice(self, req: ChatCompletionRequest, c: CompletionOutput, started: ChatStart) -> ChatChoice:
        thought, content, calls = started.read(c)
        finish = started.plan.finish_reason_of_calls if calls and c.finish_reason == "stop" else c.finish_reason
        message = ChatResponseMessage(role=self._role(req), content=content, reasoning=thought,
                                      tool_calls=calls or None)
        return ChatChoice(index=c.index, message=message,
                          logprobs=self._logprobs(req, c.token_ids, c.logprobs),
                          finish_reason=finish, stop_reason=c.stop_reason,
                          token_ids=list(c.token_ids) if self._sends_ids(req) else None)

    # -- stream ----------------------------------------------------------------------------------
    async def _stream(self, req, started: ChatStart, tracker: RequestTracker) -> AsyncIterator[str | bytes]:
        model, request_id, request = started.model, started.request_id, started.request
        plan, reasoning = started.plan, started.reasoning
        state = StreamState(every_token=not self.client.has_tokenizer)
        tool_streams = {i: ToolCallStream(plan) for i in range(req.n)} if plan.mode != "none" else {}
        thinking = {i: reasoning.stream() for i in range(req.n)} if reasoning else {}
        include_usage, continuous_usage = stream_usage_flags(req, self.config)
        num_prompt = len(request.first.prompt_token_ids)
        # return_token_ids: a chunk for every new token (none held back, even while the parsers hold its
        # text), so the chunks' ids add up to the choice's; the prompt's ids go in the role chunks
        send_ids = self._sends_ids(req)
        prompt_ids = list(request.first.prompt_token_ids) if req.return_token_ids else None
        need_tokens = req.logprobs or plan.mode != "none" or bool(reasoning) or send_ids
        final: RequestOutput | None = None
        # content-only chunks (no logprobs, no tools, no usage in each) skip pydantic
        fast = ChunkEncoder(request_id, model, "chat.completion.chunk") \
            if not req.logprobs and plan.mode == "none" and not reasoning and not continuous_usage else None
        outcome = "abort"
        try:
            for i in range(req.n):  # the role comes first, in a chunk of its own, as OpenAI sends it
                yield _chunk_event(ChatCompletionChunk(id=request_id, model=model, choices=[
                    ChatChunkChoice(index=i, delta=ChatDelta(role=self._role(req), content=""))],
                    usage=choice_usage(num_prompt, None, i) if continuous_usage else None,
                    prompt_token_ids=prompt_ids))
            if echo := self._echo(req):  # the echoed message, before what is generated (as vLLM sends it)
                for i in range(req.n):
                    yield _chunk_event(ChatCompletionChunk(id=request_id, model=model, choices=[
                        ChatChunkChoice(index=i, delta=ChatDelta(content=echo))],
                        usage=choice_usage(num_prompt, None, i) if continuous_usage else None))
            async for out in request:
                tracker.observe(0, out)
                final = accumulate(final, out)
                texts = {c.index: c.text for c in final.outputs}
                for c in out.outputs:
                    d = state.delta(0, c, need_tokens=need_tokens)
                    if d is not None and fast is not None:
                        yield fast.chat(c.index, d.text or None, d.finish_reason, d.stop_reason,
                                        d.token_ids if send_ids else None)
                    elif d is not None:
                        choice = self._chunk_choice(req, c, d)
                        if send_ids:
                            choice.token_ids = d.token_ids
                        if thinking:  # the reasoning goes out as it comes; tools read the content after it
                            choice.delta.reasoning, choice.delta.content = thinking[c.index].step(
                                d.text, d.token_ids, d.finish_reason is not None)
                        if tool_streams and not (thinking and not thinking[c.index].content):
                            # tools read the content alone: none yet while it thinks (a named function's
                            # call would open on nothing, before the reasoning is over)
                            _tool_deltas(choice, d, plan, tool_streams[c.index],
                                         thinking[c.index].content if thinking else texts[c.index])
                        if (tool_streams or thinking) and not (choice.delta.content or choice.delta.reasoning or
                                                               choice.delta.tool_calls or choice.finish_reason
                                                               or choice.logprobs or choice.token_ids):
                            continue  # text held back (a possible tool call or tag): nothing to send yet
                        yield _chunk_event(ChatCompletionChunk(
                            id=request_id, model=model, choices=[choice],
                            usage=choice_usage(num_prompt, final, c.index) if continuous_usage else None))
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


def _tool_deltas(choice: ChatChunkChoice, d: ChoiceDelta, plan: ToolPlan, stream: ToolCallStream, text: str) -> None:
    """With tools, a chunk carries the content that is final and the tool-call deltas of the output so far."""
    if d.finish_reason:
        choice.delta.content, calls, has_calls = stream.finish(text)
        if has_calls and d.finish_reason == "stop":
            choice.finish_reason = plan.finish_reason_of_calls
    else:
        choice.delta.content, calls = stream.step(text)
    choice.delta.tool_calls = calls or None
