"""What the engine returns for a request, in vLLM's shape (RequestOutput / CompletionOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's log-probability, its 1-based rank in the vocabulary, and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One position's logprobs: the chosen token plus the top-k alternatives, keyed by token id.
PositionLogprobs = dict[int, Logprob]


@dataclass
class SequenceStats:
    """One sequence's (one choice of one prompt) way through the engine, as vLLM's RequestStateStats: all four
    times by its core's clock (time.monotonic() there), so its phases are true however late the front end read
    them, and whichever host the core ran on. max_tokens as resolved for it, n: its prompt's choices,
    num_cached_tokens: its prompt tokens the prefix cache served at its first admission (its core's figure), of
    them num_external_cached_tokens from outside the core's GPU cache (a KV offload tier, a disaggregated prefill);
    engine_index: the data-parallel core that ran it. Filled in as its outputs come (the times with its first and
    last tokens) and carried by each of its outputs."""

    max_tokens: int
    n: int = 1
    queued_time: float | None = None  # the core took it in (vLLM's QUEUED event)
    first_scheduled_time: float | None = None  # a step first included it (vLLM's first SCHEDULED, preemptions not)
    first_token_time: float | None = None  # the step that gave its first token
    last_token_time: float | None = None  # the step that gave its last token
    num_cached_tokens: int = 0  # its prompt tokens served by the prefix cache (sent with its first token)
    num_external_cached_tokens: int = 0
    engine_index: int = 0


@dataclass
class CompletionOutput:
    """One of the n completions of a request. `text` and `token_ids` are cumulative."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    # DELTA outputs of the serving front end: the core's clock (time.monotonic()) at each step that gave this
    # delta's tokens, one per step (several tokens of one step, e.g. accepted proposals, share one), so that
    # inter-token latency is timed between steps as vLLM times it, whatever folding or lag came after
    step_times: list[float] | None = None
    stats: SequenceStats | None = None  # its way through the engine so far, for the per-request series

    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def lora_request(self) -> None:
        """vLLM's field: the LoRA adapter that produced it; always None (meshserve serves no adapters)."""
        return None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """The state of one request after an engine step (or at its end)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    extra: dict = field(default_factory=dict)
    kv_transfer_params: dict | None = None  # a producer's held KV: the decode leg's handle (vLLM's field)

    # vLLM's fields for what meshserve does not do (LoRA adapters, encoder-decoder and multimodal models): read
    # as vLLM returns them for a plain decoder-only text request, so code written for vLLM reads them unchanged
    @property
    def lora_request(self) -> None:
        return None

    @property
    def encoder_prompt(self) -> None:
        return None

    @property
    def encoder_prompt_token_ids(self) -> None:
        return None

    @property
    def multi_modal_placeholders(self) -> dict:
        return {}
