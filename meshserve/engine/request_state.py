"""Engine-side state of one request: its n sequences, their text, logprobs and timing."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.engine.sequence import Sequence
from meshserve.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from meshserve.sampling import SamplingParams


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list  # IncrementalDetokenizer per sequence, or None without a tokenizer
    metrics: RequestMetrics
    texts: list[str] = field(default_factory=list)  # text released so far (stop-string hold-back applied)
    logprobs: list[list[PositionLogprobs]] = field(default_factory=list)
    cumulative_logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    def __post_init__(self):
        n = len(self.seqs)
        self.texts = [""] * n
        self.logprobs = [[] for _ in range(n)]
        self.cumulative_logprobs = [0.0] * n
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no context to score it

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def to_output(self) -> RequestOutput:
        want_lp = self.params.logprobs is not None
        outputs = [
            CompletionOutput(
                index=s.index,
                text=self.texts[i],
                token_ids=list(s.output_token_ids),
                cumulative_logprob=self.cumulative_logprobs[i] if want_lp else None,
                logprobs=list(self.logprobs[i]) if want_lp else None,
                finish_reason=s.status.finish_reason,
                stop_reason=s.stop_reason,
            )
            for i, s in enumerate(self.seqs)
        ]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=self.finished,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            num_cached_tokens=self.seqs[0].num_cached_tokens,
            metrics=self.metrics,
        )


def position_logprobs(info, decode) -> PositionLogprobs:
    """Chosen token first, then the alternatives, as {token_id: Logprob}."""
    out: PositionLogprobs = {info.token_id: Logprob(info.logprob, info.rank, decode(info.token_id))}
    for rank, (tid, lp) in enumerate(zip(info.top_ids, info.top_logprobs), start=1):
        if tid not in out:
            out[tid] = Logprob(lp, rank, decode(tid))
    return out
