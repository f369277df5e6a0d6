"""One sequence being generated: its tokens, how many of them are in the KV cache, and its status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshserve.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, to be recomputed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    def __init__(self, value: str):
        # a plain attribute of each member, not a property: read for every sequence several times a step
        self.finished = value in ("stop", "length", "abort")

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


@dataclass(eq=False)
class Sequence:
    """A request's prompt plus one completion. A request with n > 1 owns n sequences sharing a prompt.

    num_computed_tokens counts the tokens whose K/V sit in the cache; the scheduler moves it forward
    after each step and back to 0 when the sequence is preempted (recompute).
    """

    seq_id: str
    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens or what fits in max_model_len
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at the first admission
    num_external_cached_tokens: int = 0  # of those, the ones from a KV offload tier or a disaggregated prefill
    block_hashes: list[bytes] = field(default_factory=list)  # hash chain of the full blocks so far
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # tokens sampled by a step still running on the GPU (async scheduling): they count in num_tokens and
    # read as -1 in token_ids_slice until update_after_step appends the real ids to output_token_ids
    num_pending_tokens: int = 0
    first_scheduled_time: float | None = None  # time.monotonic() when a step first included it
    queued_time: float = field(default_factory=time.monotonic)  # when the core took it in: its queue time's start
    priority: int = 0  # lower runs first under the priority policy (vLLM's convention)
    slo_ttft_s: float | None = None  # this request's targets (None: the server's, if any)
    slo_tpot_s: float | None = None
    grammar: Any = None  # xgrammar GrammarMatcher of a constrained output: it has accepted every output token
    grammar_stop_ids: frozenset[int] = frozenset()  # the tokens whose acceptance can end the grammar
    # the end-of-reasoning token the grammar waits for (structured outputs after a reasoning span): until the
    # output holds it, the matcher sees no token and the row is not masked; None: the grammar holds now
    grammar_after_token: int | None = None
    # speculative decoding: proposed next tokens awaiting verification (never in output_token_ids, never
    # in the prefix cache), and how many tokens the last step appended (accepted proposals + 1)
    spec_token_ids: list[int] = field(default_factory=list)
    num_step_tokens: int = 1
    # async scheduling: the pending tokens when the proposals were made (they hold while that count does),
    # and how many proposals of the step in flight they assumed accepted (-1: none in flight)
    spec_offset: int = 0
    spec_assumed_accepted: int = -1
    # token_array()'s buffer and how many tokens it holds (tokens are only ever appended)
    _token_buffer: np.ndarray | None = field(default=None, repr=False)
    _token_buffer_len: int = field(default=0, repr=False)
    # the n-gram proposer's incremental index of these tokens (spec_decode/ngram_proposer.py's NgramIndex)
    ngram_index: Any = field(default=None, repr=False)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Tokens the sequence has or will have once running steps finish (pending ones included)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without building the whole list (-1 for pending ones)."""
        p = len(self.prompt_token_ids)
        known = p + len(self.output_token_ids)
        if end > known:
            if start >= known:  # only pending tokens: a decode row under async scheduling, every step
                return [-1] * (end - start)
            return self.token_ids_slice(start, known) + [-1] * (end - known)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    def token_array(self) -> np.ndarray:
        """The known tokens (prompt + output) as an int64 array, extended by the tokens appended since the
        last call rather than rebuilt (a proposer reads them every step). A view: read it, don't keep it."""
        n = self.num_known_tokens
        buf, have = self._token_buffer, self._token_buffer_len
        if buf is None or buf.shape[0] < n:
            grown = np.empty(max(2 * n, 64), dtype=np.int64)
            grown[:have] = buf[:have] if buf is not None else grown[:0]
            buf = self._token_buffer = grown
        p = len(self.prompt_token_ids)
        if have < p:
            buf[have:p] = self.prompt_token_ids[have:]
            have = p
        if have < n:
            buf[have:n] = self.output_token_ids[have - p :]
        self._token_buffer_len = n
        return buf[:n]

    @property
    def is_finished(self) -> bool:
        return self.status.finished
