"""The front end's output side: core deltas -> RequestOutputs, with text, stop strings and logprob text.

The core sends each new token once. Here every request keeps what its caller will need: incremental
detokenization (IncrementalDetokenizer), stop strings (a match finishes the completion here and is returned
in `requests_to_abort` so the core stops within one step), logprob texts, and the n completions of a
request gathered under one RequestOutput, in the shape the request asked for (cumulative, delta or final).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

from meshserve.engine.detokenizer import IncrementalDetokenizer
from meshserve.engine.input_processor import ProcessedRequest
from meshserve.engine.messages import EngineCoreOutputs, TokenLogprobs
from meshserve.outputs import (
    CompletionOutput,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
    SequenceStats,
)
from meshserve.sampling import RequestOutputKind, SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
# A run of tokens that never completes a character (invalid bytes) is let go after this many, so that each
# position's decode stays short; the text shows those bytes as U+FFFD either way.
_MAX_HELD_TOKENS = 8


def _held_back(text: str, held: list[int], last: bool) -> bool:
    """Whether a token whose text (after the held ids) is `text` only adds bytes of an unfinished character."""
    return text.endswith(_REPLACEMENT_CHAR) and not last and len(held) < _MAX_HELD_TOKENS


def token_texts_in_context(tokenizer: Any, token_ids: list[int]) -> list[str]:
    """Each token's text as the sequence's text shows it: a token that ends inside a multi-byte character
    (byte-level BPE splits an emoji or a CJK character over tokens) reads "", and the token that completes the
    character reads all of it, so the texts laid end to end are the decoded text. The last token flushes what
    is still held (the text shows incomplete bytes at the end as U+FFFD)."""
    held: list[int] = []
    texts = []
    for i, tid in enumerate(token_ids):
        text = tokenizer.decode([*held, tid])
        if _held_back(text, held, last=i == len(token_ids) - 1):
            held.append(tid)
            texts.append("")
        else:
            held.clear()
            texts.append(text)
    return texts


class _Completion:
    """One of a request's n completions, as far as the front end has received it."""

    __slots__ = (
        "cumulative_logprob",
        "detokenizer",
        "finish_reason",
        "held_ids",
        "index",
        "logprobs",
        "num_sent_chars",
        "num_sent_tokens",
        "stats",
        "step_times",
        "stop_reason",
        "text",
        "token_ids",
    )

    def __init__(self, index: int, detokenizer: IncrementalDetokenizer | None, want_logprobs: bool,
                 stats: SequenceStats):
        self.index = index
        self.detokenizer = detokenizer
        self.token_ids: list[int] = []
        self.text = ""  # released text (stop-string hold-back applied)
        self.logprobs: list[PositionLogprobs] | None = [] if want_logprobs else None
        self.held_ids: list[int] = []  # logprob texts: output ids of a character not complete yet
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_sent_tokens = 0  # for DELTA outputs: what earlier outputs already carried
        self.num_sent_chars = 0
        self.step_times: list[float] = []  # the core's time of each step with tokens not yet in a DELTA output
        self.stats = stats

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cumulative(self) -> CompletionOutput:
        want_lp = self.logprobs is not None
        return CompletionOutput(index=self.index, text=self.text, token_ids=list(self.token_ids),
                                cumulative_logprob=self.cumulative_logprob if want_lp else None,
                                logprobs=list(self.logprobs) if want_lp else None,
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason,
                                stats=self.stats)

    def delta(self) -> CompletionOutput:
        want_lp = self.logprobs is not None
        k, c = self.num_sent_tokens, self.num_sent_chars
        self.num_sent_tokens, self.num_sent_chars = len(self.token_ids), len(self.text)
        times, self.step_times = self.step_times, []
        return CompletionOutput(index=self.index, text=self.text[c:], token_ids=self.token_ids[k:],
                                cumulative_logprob=self.cumulative_logprob if want_lp else None,
                                logprobs=self.logprobs[k:] if want_lp else None,
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason,
                                step_times=times, stats=self.stats)


@dataclass
class RequestState:
    """Front-end state of one request: its prompt, its n completions, logprobs and timing."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[_Completion]
    metrics: RequestMetrics
    child_ids: list[str]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    prompt_logprobs_sent: bool = False  # DELTA outputs carry the prompt's logprobs once
    prompt_held_ids: list[int] = field(default_factory=list)  # as _Completion.held_ids, for prompt logprobs
    kv_transfer_params: dict | None = None  # from the core's final output of a producer's request
    queue: Any = None  # the async front end's delivery target for this request

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.completions)

    def make_output(self, changed: list[_Completion] | None, finished: bool | None = None) -> RequestOutput | None:
        """The RequestOutput of the request's output kind (changed: the completions this step touched;
        finished: self.finished when the caller has it already)."""
        kind = self.params.output_kind
        finished = self.finished if finished is None else finished
        if kind is RequestOutputKind.DELTA and changed is not None:
            outputs = [c.delta() for c in changed]
            prompt_logprobs = None
            if self.prompt_logprobs is not None and not self.prompt_logprobs_sent \
                    and any(c.token_ids for c in changed):
                prompt_logprobs, self.prompt_logprobs_sent = self.prompt_logprobs, True
        elif kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        else:
            outputs = [c.cumulative() for c in self.completions]
            prompt_logprobs = list(self.prompt_logprobs) if self.prompt_logprobs is not None else None
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=self.prompt_token_ids, outputs=outputs, finished=finished,
                             prompt_logprobs=prompt_logprobs, num_cached_tokens=self.num_cached_tokens,
                             metrics=self.metrics, kv_transfer_params=self.kv_transfer_params)


@dataclass
class ProcessedOutputs:
    """What one batch of core outputs produced: outputs to hand out, and core requests to abort."""

    request_outputs: list[RequestOutput] = field(default_factory=list)
    states: list[RequestState] = field(default_factory=list)  # the state of each output, same order
    requests_to_abort: list[str] = field(default_factory=list)


class OutputProcessor:
    """Keeps every unfinished request's front-end state and turns EngineCoreOutputs into RequestOutputs.

    It owns its own copy of the tokenizer, so it may run on a thread other than the one that tokenizes
    prompts (a Rust tokenizer used from two threads at once can fail).
    """

    def __init__(self, tokenizer: Any | None, own_copy: Any | None = None):
        """own_copy: a deep copy of tokenizer made ahead by the caller (early_tokenizer.py, on its thread)."""
        if own_copy is None and tokenizer is not None:
            own_copy = copy.deepcopy(tokenizer)
        self.tokenizer = own_copy
        self.requests: dict[str, RequestState] = {}
        self._children: dict[str, tuple[RequestState, _Completion]] = {}
        self._token_text: dict[int, str] = {}  # one token's text, for logprobs (context-free, so cached)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def num_running_completions(self) -> int:
        """Core requests (completions) not finished yet."""
        return len(self._children)

    def add_request(self, request: ProcessedRequest, queue: Any = None) -> RequestState:
        if request.request_id in self.requests:
            from meshserve.errors import InvalidArgumentError

            raise InvalidArgumentError(f"request id {request.request_id} is already in use", param="request_id")
        params = request.params
        want_lp = params.logprobs is not None
        completions = [
            _Completion(i, IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params)
                        if self.tokenizer is not None else None, want_lp, SequenceStats(core.max_tokens, params.n))
            for i, core in enumerate(request.core_requests)
        ]
        state = RequestState(request.request_id, request.prompt, request.prompt_token_ids, params, completions,
                             RequestMetrics(request.arrival_time),
                             [r.request_id for r in request.core_requests], queue=queue)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]  # the first prompt token has no context to score it
            first = request.prompt_token_ids[:1]
            if first and self.tokenizer is not None and len(request.prompt_token_ids) > 1 \
                    and self._decode_token(first[0]).endswith(_REPLACEMENT_CHAR):
                state.prompt_held_ids.append(first[0])  # the next prompt token's text completes its character
        self.requests[request.request_id] = state
        for child_id, c in zip(state.child_ids, completions):
            self._children[child_id] = (state, c)
        return state

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request; returns the core ids of its completions still running (to abort in the core)."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        running = []
        for child_id, c in zip(state.child_ids, state.completions):
            if self._children.pop(child_id, None) is not None and not c.finished:
                running.append(child_id)
        return running

    def request_of(self, child_id: str) -> RequestState | None:
        """The request a core request id belongs to (None once it is finished or aborted)."""
        entry = self._children.get(child_id)
        return entry[0] if entry is not None else None

    # -- one batch of core outputs ---------------------------------------------------------------
    def process_outputs(self, core_outputs: EngineCoreOutputs, finished_only: bool = False) -> ProcessedOutputs:
        result = ProcessedOutputs()
        now = time.monotonic()
        touched: dict[str, tuple[RequestState, list[_Completion]]] = {}
        for out in core_outputs.outputs:
            entry = self._children.get(out.request_id)
            if entry is None:
                continue  # aborted, or finished by a stop string while this step ran
            state, comp = entry
            if out.new_prompt_logprobs and state.prompt_logprobs is not None:
                num_prompt = len(state.prompt_token_ids)
                for info in out.new_prompt_logprobs:  # in order; the prompt's last token flushes held bytes
                    last = len(state.prompt_logprobs) == num_prompt - 1
                    state.prompt_logprobs.append(self._position_logprobs(info, state.prompt_held_ids, last))
            if out.kv_transfer_params is not None:
                state.kv_transfer_params = out.kv_transfer_params
            if out.new_token_ids or out.finish_reason:
                self._update_completion(state, comp, out, now, result, core_outputs.timestamp or now,
                                        core_outputs.engine_index)
                changed = touched.setdefault(state.request_id, (state, []))[1]
                changed.append(comp)
            if comp.finished:
                self._children.pop(out.request_id, None)
        for state, changed in touched.values():
            finished = state.finished
            if finished:
                state.metrics.finished_time = now
                self.requests.pop(state.request_id, None)
            if finished_only and not finished:
                continue
            output = state.make_output(changed, finished)
            if output is not None:
                result.request_outputs.append(output)
                result.states.append(state)
        return result

    def _update_completion(self, state: RequestState, comp: _Completion, out, now: float,
                           result: ProcessedOutputs, step_time: float, engine_index: int = 0) -> None:
        comp.stats.engine_index = engine_index  # (a sequence runs on one core)
        new_ids = out.new_token_ids
        if new_ids:
            if state.params.output_kind is RequestOutputKind.DELTA:
                comp.step_times.append(step_time)
            metrics = state.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
                metrics.first_scheduled_time = out.first_times[1] if out.first_times else None
            stats = comp.stats
            if stats.first_token_time is None:  # the core sends its first times with its first token
                # a core that sends none (a stand-in): queued at the request's arrival, scheduled for that step
                queued, scheduled = out.first_times or (None, None)
                stats.queued_time = queued if queued is not None else metrics.arrival_time
                stats.first_scheduled_time = scheduled if scheduled is not None else step_time
                stats.first_token_time = step_time
                stats.num_cached_tokens = out.num_cached_tokens
                stats.num_external_cached_tokens = out.num_external_cached_tokens
            stats.last_token_time = step_time
            if comp.index == 0 and not comp.token_ids:
                state.num_cached_tokens = out.num_cached_tokens
            comp.token_ids.extend(new_ids)
            if out.new_logprobs and comp.logprobs is not None:
                final = len(out.new_logprobs) - 1 if out.finish_reason else -1
                for i, info in enumerate(out.new_logprobs):
                    comp.logprobs.append(self._position_logprobs(info, comp.held_ids, last=i == final))
                    comp.cumulative_logprob += info.logprob
        if out.finish_reason:
            comp.finish_reason, comp.stop_reason = out.finish_reason, out.stop_reason
        detok = comp.detokenizer
        if detok is None:
            return
        if new_ids:
            # a token that ended the sequence (EOS, stop_token_ids) is not part of the text, like vLLM; it is the
            # step's last, after any accepted proposals (speculative decoding), which are
            if out.finish_reason == "stop" and not state.params.include_stop_str_in_output:
                new_ids = new_ids[:-1]
            if detok.update(new_ids) is not None and not comp.finished:
                comp.finish_reason = "stop"
                result.requests_to_abort.append(out.request_id)
        comp.text += detok.get_delta(finished=comp.finished)
        # a stop string that cut the text is the reason, as in vLLM, also when the core finished the sequence in
        # the same step (max_tokens, a stop token) or the final flush of withheld bytes completed it
        if detok.matched_stop is not None:
            comp.finish_reason, comp.stop_reason = "stop", detok.matched_stop

    def _position_logprobs(self, info: TokenLogprobs, held: list[int], last: bool = False) -> PositionLogprobs:
        """Chosen token first, then the alternatives, as {token_id: Logprob}.

        Texts are in context, as token_texts_in_context's: held are the sequence's ids before this position
        whose character is not complete yet (their bytes go to the text of the token that completes it; held
        is then moved past the chosen token); last: the sequence ends here, so held bytes are flushed.
        """
        def text(tid: int) -> str | None:
            alone = self._decode_token(tid)
            if alone is None:
                return None
            in_context = self.tokenizer.decode([*held, tid]) if held else alone
            return "" if _held_back(in_context, held, last) else in_context

        chosen = text(info.token_id)
        out: PositionLogprobs = {info.token_id: Logprob(info.logprob, info.rank, chosen)}
        for rank, (tid, lp) in enumerate(zip(info.top_ids, info.top_logprobs), start=1):
            if tid not in out:
                out[tid] = Logprob(lp, rank, text(tid))
        if chosen == "" and (held or self._decode_token(info.token_id)):  # held back (not a token reading "")
            held.append(info.token_id)
        else:
            held.clear()
        return out

    def _decode_token(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text
