"""vLLM's per-request histograms: each finished sequence's phases in the engine and its token counts (and
its prompt's n, and the most tokens of its choices, once they all finished).

Observed once per sequence (one choice of one prompt: vLLM runs each as an engine request of its own) that
finished (stop, length, or aborted by the engine), when its last output reaches the server. Those whose client
went away are not, as in vLLM, whose client aborts leave the output processor without finished-request stats. The phases are vLLM's
(IterationStats.update_from_finished_request), from the core's own times (SequenceStats):
  queue = first scheduled - queued in the core     prefill = first token - first scheduled
  decode = last token - first token                inference = last token - first scheduled (= prefill + decode)
  time per output token = decode / (generated tokens - 1), 0 for a single token.
Prefill KV computed tokens: its prompt tokens less those its first admission found in the prefix cache (vLLM's
prompt tokens - num_cached_tokens, never below 0): the KV its prefill really computed.
Preemptions fall inside the phase they happened in. Plain prometheus_client histograms labelled as vLLM's
(model_name, engine: the data-parallel core that ran the sequence): with several API processes
(multiprocess_metrics.py) they are written to each process's files and summed on a scrape like the others.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from meshserve.outputs import SequenceStats

# vLLM's buckets (vllm/v1/metrics/loggers.py): request_latency_buckets (also e2e_request_latency_seconds'),
# request_time_per_output_token_seconds' (also inter_token_latency_seconds'), request_params_n's
PHASE_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                 480.0, 960.0, 1920.0, 7680.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
N_BUCKETS = (1, 2, 5, 10, 20)
LABELS = ("model_name", "engine")  # vLLM's labels of every per-engine series
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

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"vllm:{name}", doc, LABELS, buckets=buckets, registry=r)

        def phase(name: str, doc: str) -> Histogram:
            return histogram(f"request_{name}_time_seconds", doc, PHASE_BUCKETS)

        self.queue = phase("queue", "Per sequence: from the engine core taking it in to its first scheduling.")
        self.prefill = phase("prefill", "Per sequence: from its first scheduling to the step of its first token.")
        self.decode = phase("decode", "Per sequence: from the step of its first token to that of its last.")
        self.inference = phase("inference", "Per sequence: from its first scheduling to the step of its last "
                               "token (prefill + decode).")
        self.tpot = histogram("request_time_per_output_token_seconds", "Per sequence: its decode time / (its "
                              "generated tokens - 1), 0 for one token.", TPOT_BUCKETS)
        tokens = buckets_1_2_5(max_model_len or _DEFAULT_MAX_TOKENS_BUCKET)
        self.prompt_tokens = histogram("request_prompt_tokens", "Per sequence: its prompt tokens.", tokens)
        self.generation_tokens = histogram("request_generation_tokens", "Per sequence: the tokens it generated.",
                                           tokens)
        self.prefill_kv_computed = histogram("request_prefill_kv_computed_tokens", "Per sequence: its prompt "
                                             "tokens less those served by the prefix cache (the KV its prefill "
                                             "computed).", tokens)
        self.max_tokens = histogram("request_params_max_tokens", "Per sequence: its max_tokens as resolved "
                                    "(unset: what fits in the context).", tokens)
        # per prompt whose n choices all finished (vLLM's parent request)
        self.n = histogram("request_params_n", "Per prompt whose n choices all finished: n.", N_BUCKETS)
        self.max_generation_tokens = histogram("request_max_num_generation_tokens", "Per prompt whose n choices "
                                               "all finished: the most tokens one of them generated.", tokens)

    def register_engine(self, labels: tuple[str, str]) -> None:
        """Export every histogram of this (model_name, engine) from the first scrape, as vLLM's."""
        for h in (self.queue, self.prefill, self.decode, self.inference, self.tpot, self.prompt_tokens,
                  self.generation_tokens, self.prefill_kv_computed, self.max_tokens, self.n,
                  self.max_generation_tokens):
            h.labels(*labels)

    def observe(self, labels: tuple[str, str], prompt_tokens: int, generation_tokens: int,
                stats: SequenceStats | None) -> None:
        """One finished sequence; stats None (an output built outside the engine): its token counts only."""
        self.prompt_tokens.labels(*labels).observe(prompt_tokens)
        self.generation_tokens.labels(*labels).observe(generation_tokens)
        if stats is None or stats.first_token_time is None:
            return
        scheduled, first, last = stats.first_scheduled_time, stats.first_token_time, stats.last_token_time
        prefill, decode = first - scheduled, last - first
        self.queue.labels(*labels).observe(scheduled - stats.queued_time)
        self.prefill.labels(*labels).observe(prefill)
        self.decode.labels(*labels).observe(decode)
        # vLLM's last - scheduled, so that the phases add up exactly
        self.inference.labels(*labels).observe(prefill + decode)
        self.tpot.labels(*labels).observe(decode / (generation_tokens - 1) if generation_tokens > 1 else 0.0)
        self.max_tokens.labels(*labels).observe(stats.max_tokens)
        self.prefill_kv_computed.labels(*labels).observe(max(prompt_tokens - stats.num_cached_tokens, 0))

    def observe_prompt(self, labels: tuple[str, str], n: int, max_generation_tokens: int) -> None:
        """A prompt whose n choices all finished."""
        self.n.labels(*labels).observe(n)
        self.max_generation_tokens.labels(*labels).observe(max_generation_tokens)
