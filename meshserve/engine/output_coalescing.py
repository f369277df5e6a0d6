"""Outputs that piled up for a caller who lags, folded into one (as vLLM's output collector does).

When a streaming client (or the event loop serving it) falls behind, several steps' outputs wait in its
queue. Handing them out one by one costs a JSON chunk, an SSE event and a socket write per step; folding them
costs nothing extra, and the client gets every token, in order, in one event.
"""

from __future__ import annotations

from meshserve.outputs import RequestOutput
from meshserve.sampling import RequestOutputKind


def fold_outputs(acc: RequestOutput, new: RequestOutput, kind: RequestOutputKind) -> RequestOutput:
    """The output that says what acc and then new said. DELTA outputs are concatenated into acc (each step's
    output is a fresh object owned by its one caller); cumulative ones are superseded by new."""
    if kind is not RequestOutputKind.DELTA:
        return new
    by_index = {c.index: c for c in acc.outputs}
    for d in new.outputs:
        c = by_index.get(d.index)
        if c is None:
            acc.outputs.append(d)
            by_index[d.index] = d
            continue
        c.text += d.text
        # in place (acc's lists are its own): a copy per fold would make folding a long pile quadratic
        c.token_ids.extend(d.token_ids)
        if d.step_times is not None:  # each step keeps its own time: inter-token latency is timed from them
            c.step_times = _extended(c.step_times, d.step_times)
        if d.logprobs is not None:
            c.logprobs = _extended(c.logprobs, d.logprobs)
        c.cumulative_logprob = d.cumulative_logprob
        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
        c.stats = d.stats or c.stats  # the finishing output's
    if acc.prompt_logprobs is None:
        acc.prompt_logprobs = new.prompt_logprobs
    acc.finished = new.finished
    acc.num_cached_tokens = new.num_cached_tokens or acc.num_cached_tokens
    acc.metrics = new.metrics
    return acc


def _extended(acc: list | None, new: list) -> list:
    """acc with new's items appended in place (a list of its own where acc has none)."""
    if acc is None:
        return list(new)
    acc.extend(new)
    return acc
