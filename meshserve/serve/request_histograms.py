"""vLLM's per-request histograms: each finished sequence's phases in the engine and its token counts (and
its prompt's n, and the most tokens of its choices, once they all finished).

Observed once per sequence (one choice of one prompt: vLLM runs each as an engine request of its own) that
ended by stop or length, when its last output reaches the server. Aborted ones are not, as in vLLM, whose client
aborts leave the output processor without finished-request stats. The phases are vLLM's
(IterationStats.update_from_finished_request), from the core's own times (SequenceStats):
  queue = first scheduled - queued in the core     prefill = first token - first scheduled
  decode = last token - first token                inference = last token - first scheduled (= prefill + decode)
  time per output token = decode / (generated tokens - 1), 0 for a single token.
Prefill KV computed tokens: its prompt tokens less those its first admission found in the prefix cache (vLLM's
prompt tokens - num_cached_tokens, never below 0): the KV its prefill really computed.
Preemptions fall inside the phase they happened in. Plain prometheus_client histograms: with several API processes
(multiprocess_metrics.py) they are written to each process's files and summed on a scrape like the others.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from meshserve.outputs import SequenceStats

# vLLM's buckets (vllm/v1/metrics/loggers.py)
_PHASE_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                  480.0, 960.0, 1920.0, 7680.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_N_BUCKETS = (1, 2, 5, 10, 20)
_DEFAULT_MAX_TOKENS_BUCKET = 1_000_000  # a server that did not say its max_model_len


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class RequestHistograms:
    """The per-request histograms of one server, registered on its registry."""

    def __init__(self, registry: CollectorRegistry, max_model_len: int | None = None) -> None:
        r = registry

        def phase(name: str, doc: str) -> Histogram:
            return Histogram(f"meshserve:request_{name}_time_seconds", doc, buckets=_PHASE_BUCKETS, registry=r)

        self.queue = phase("queue", "Per sequence: from the engine core taking it in to its first scheduling.")
        self.prefill = phase("prefill", "Per sequence: from its first scheduling to the step of its first token.")
        self.decode = phase("decode", "Per sequence: from the step of its first token to that of its last.")
        self.inference = phase("inference", "Per sequence: from its first scheduling to the step of its last "
                               "token (prefill + decode).")
        self.tpot = Histogram("meshserve:request_time_per_output_token_seconds", "Per sequence: its decode time / "
                              "(its generated tokens - 1), 0 for one token.", buckets=_TPOT_BUCKETS, registry=r)
        tokens = buckets_1_2_5(max_model_len or _DEFAULT_MAX_TOKENS_BUCKET)
        self.prompt_tokens = Histogram("meshserve:request_prompt_tokens", "Per sequence: its prompt tokens.",
                                       buckets=tokens, registry=r)
        self.generation_tokens = Histogram("meshserve:request_generation_tokens", "Per sequence: the tokens it "
                                           "generated.", buckets=tokens, registry=r)
        self.prefill_kv_computed = Histogram("meshserve:request_prefill_kv_computed_tokens", "Per sequence: its "
                                             "prompt tokens less those served by the prefix cache (the KV its "
                                             "prefill computed).", buckets=tokens, registry=r)
        self.max_tokens = Histogram("meshserve:request_params_max_tokens", "Per sequence: its max_tokens as "
                                    "resolved (unset: what fits in the context).", buckets=tokens, registry=r)
        # per prompt whose n choices all finished (vLLM's parent request)
        self.n = Histogram("meshserve:request_params_n", "Per prompt whose n choices all finished: n.",
                           buckets=_N_BUCKETS, registry=r)
        self.max_generation_tokens = Histogram("meshserve:request_max_num_generation_tokens", "Per prompt whose "
                                               "n choices all finished: the most tokens one of them generated.",
                                               buckets=tokens, registry=r)

    def observe(self, prompt_tokens: int, generation_tokens: int, stats: SequenceStats | None) -> None:
        """One finished sequence; stats None (an output built outside the engine): its token counts only."""
        self.prompt_tokens.observe(prompt_tokens)
        self.generation_tokens.observe(generation_tokens)
        if stats is None or stats.first_token_time is None:
            return
        scheduled, first, last = stats.first_scheduled_time, stats.first_token_time, stats.last_token_time
        prefill, decode = first - scheduled, last - first
        self.queue.observe(scheduled - stats.queued_time)
        self.prefill.observe(prefill)
        self.decode.observe(decode)
        self.inference.observe(prefill + decode)  # vLLM's last - scheduled, so that the phases add up exactly
        self.tpot.observe(decode / (generation_tokens - 1) if generation_tokens > 1 else 0.0)
        self.max_tokens.observe(stats.max_tokens)
        self.prefill_kv_computed.observe(max(prompt_tokens - stats.num_cached_tokens, 0))

    def observe_prompt(self, n: int, max_generation_tokens: int) -> None:
        """A prompt whose n choices all finished."""
        self.n.observe(n)
        self.max_generation_tokens.observe(max_generation_tokens)
