"""Prometheus metrics of the server, each app with its own CollectorRegistry.

Request-level series (outcomes, token totals, latency histograms) are observed by the handlers as they
stream; engine-level gauges (queue, KV cache, prefix cache, preemptions) are the counters the engine core
published with its last step (a scrape never waits on the core), with their age as a gauge of its own.
With several API processes (PROMETHEUS_MULTIPROC_DIR set before import) request series are summed across them. Names follow vLLM's `vllm:` series with a `meshserve:` prefix.

The admission margin (engine/admission_margin.py) is the API process's own: each process admits its requests
against the margin its own controller learned from the requests it served. Its gauges are written when the
controller updates, in multiprocess_mode="all": one series per process, labelled with its pid, since the
controllers see different requests and may well disagree; a min or max across processes would hide which one
is tight, and the dashboard can still take either. (Any API process's death stops the server, so a dead
process's series cannot linger and the "live" modes buy nothing.) Its update counter is summed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from meshserve.errors import MeshserveError, RetryableError
from meshserve.outputs import RequestOutput, SequenceStats
from meshserve.serve import multiprocess_metrics
from meshserve.serve.frontend_load import ARRIVAL
from meshserve.serve.request_histograms import RequestHistograms
from meshserve.serve.request_log import RequestLog, unix_time_of

if TYPE_CHECKING:
    from meshserve.engine.admission_margin import AdmissionMargin

# Outcomes of a generation request: how its choices finished, or why it produced none.
OUTCOMES = ("stop", "length", "abort", "rejected", "invalid", "error")

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0)


class _EngineStatsCollector(Collector):
    """Turns the core's last published counters into gauge and counter families."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] | None = None
        self.age_s: float | None = None
        self.expert_load: list[list[int]] = []  # the last per-expert counts the core published (MoE only)

    def collect(self) -> Iterator[Metric]:
        s = self.stats or {}
        if self.age_s is not None:
            g = GaugeMetricFamily("meshserve:engine_stats_age_seconds",
                                  "Seconds since the engine core published the counters below (with its last step).")
            g.add_metric([], self.age_s)
            yield g
        gauges = [
            ("meshserve:num_requests_running", "Sequences in the running batch.", "num_running"),
            ("meshserve:num_requests_waiting", "Sequences waiting to be scheduled.", "num_waiting"),
            ("meshserve:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", "kv_cache_usage"),
            ("meshserve:prefix_cache_hit_rate", "Prefix cache hit tokens / queried tokens since start (0-1).",
             "prefix_cache_hit_rate"),
            ("meshserve:queue_wait_predicted_seconds", "Predicted wait of a request joining the queue now.",
             "queue_wait_s"),
            ("meshserve:step_time_predicted_seconds", ("Device time the step-time model predicted for the last "
             "measured step."), "step_time_predicted_s"),
            ("meshserve:step_time_actual_seconds", "Device time the last measured step took.", "step_time_actual_s"),
            ("meshserve:step_time_model_error", "Recent mean |predicted - actual| / actual of step times.",
             "step_time_model_error"),
        ]
        for name, doc, key in gauges:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(s.get(key) or 0.0))
            yield g
        counters = [
            ("meshserve:num_preemptions", "Sequences preempted to free KV blocks.", "num_preemptions"),
            ("meshserve:prefix_cache_queries", ("Prefix cache queries: prompt tokens looked up by sequences at "
             "their first admission (a preempted one's recompute not again)."), "prefix_cache_queries"),
            ("meshserve:prefix_cache_hits", "Prefix cache hits: prompt tokens of those found cached.",
             "prefix_cache_hits"),
            ("meshserve:requests_shed", ("Queued requests dropped by the engine because their time-to-first-token "
             "target could no longer be met."), "num_shed"),
            # speculative decoding, after vLLM's vllm:spec_decode_* counters
            ("meshserve:spec_decode_num_drafts", "Verify rows: sequences that verified proposals in a step.",
             "spec_num_drafts"),
            ("meshserve:spec_decode_num_draft_tokens", "Proposed tokens verified.", "spec_num_draft_tokens"),
            ("meshserve:spec_decode_num_accepted_tokens", "Proposed tokens accepted.", "spec_num_accepted_tokens"),
        ]
        for name, doc, key in counters:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(s.get(key) or 0))
            yield c
        per_pos = s.get("spec_num_accepted_tokens_per_pos") or []
        if per_pos:
            c = CounterMetricFamily("meshserve:spec_decode_num_accepted_tokens_per_pos",
                                    "Proposed tokens accepted, by position in the proposal.", labels=["position"])
            for pos, n in enumerate(per_pos):
                c.add_metric([str(pos)], float(n))
            yield c
        self.expert_load = s.get("expert_load") or self.expert_load
        if self.expert_load:
            c = CounterMetricFamily("meshserve:moe_expert_tokens", "Tokens routed to each expert of each MoE layer "
                                    "(moe_layer counts the MoE layers of the first pipeline stage in order).",
                                    labels=["moe_layer", "expert"])
            for layer, counts in enumerate(self.expert_load):
                for expert, n in enumerate(counts):
                    c.add_metric([str(layer), str(expert)], float(n))
            yield c
        yield from _kv_offload_families(s)
        yield from _kv_transfer_families(s)
        yield from _per_engine_families(s.get("engines") or [])


def _per_engine_families(engines: list[dict[str, Any]]) -> Iterator[Metric]:
    """Data parallel: each engine core's own gauges, labelled engine="i" (the unlabelled series above are the
    server's sums; these show how the load is spread)."""
    if not engines:
        return
    for name, doc, key in (
            ("meshserve:engine_num_requests_running", "Sequences in this engine core's running batch.", "num_running"),
            ("meshserve:engine_num_requests_waiting", "Sequences waiting in this engine core.", "num_waiting"),
            ("meshserve:engine_kv_cache_usage_perc", "Fraction of this engine core's KV cache in use.",
             "kv_cache_usage"),
            ("meshserve:engine_queue_wait_predicted_seconds", "Predicted wait of a request joining this core now.",
             "queue_wait_s")):
        g = GaugeMetricFamily(name, doc, labels=["engine"])
        for i, e in enumerate(engines):
            g.add_metric([str(i)], float(e.get(key) or 0.0))
        yield g


def _kv_offload_families(s: dict[str, Any]) -> Iterator[Metric]:
    """KV offload tiers (engine/kv_offload): hits, bytes and blocks per tier, restore time, swaps."""

    def v(key: str) -> float:
        return float(s.get(f"kv_offload_{key}") or 0)

    hits = CounterMetricFamily("meshserve:kv_offload_hits", "Prefix blocks restored from a KV offload tier.",
                               labels=["tier"])
    blocks = GaugeMetricFamily("meshserve:kv_offload_blocks", "KV blocks held in an offload tier now.",
                               labels=["tier"])
    for tier in ("cpu", "disk"):
        hits.add_metric([tier], v(f"{tier}_hits"))
        blocks.add_metric([tier], v(f"{tier}_blocks"))
    moved = CounterMetricFamily("meshserve:kv_offload_bytes", "Bytes of KV blocks moved into (stored, written) "
                                "or out of (loaded, read) an offload tier.", labels=["tier", "direction"])
    for tier, direction, key in (("cpu", "in", "cpu_bytes_stored"), ("cpu", "out", "cpu_bytes_loaded"),
                                 ("disk", "in", "disk_bytes_written"), ("disk", "out", "disk_bytes_read")):
        moved.add_metric([tier, direction], v(key))
    swaps = CounterMetricFamily("meshserve:kv_offload_swaps", "Preempted sequences swapped out to the CPU tier "
                                "and back in.", labels=["direction"])
    swaps.add_metric(["out"], v("swaps_out"))
    swaps.add_metric(["in"], v("swaps_in"))
    yield from (hits, blocks, moved, swaps)
    # one unlabelled value each: (family, name, help, stats key)
    for family, name, doc, key in (
            (CounterMetricFamily, "restore_seconds", "Device time of the copies that restored KV blocks from the "
             "CPU tier.", "restore_s"),
            (CounterMetricFamily, "restores", "Batches of restore copies timed.", "restores"),
            (CounterMetricFamily, "disk_errors", "KV block files found missing, truncated or corrupted (each a "
             "cache miss, recomputed).", "disk_errors"),
            (CounterMetricFamily, "disk_restores_skipped", "Prefix runs found on disk but recomputed: reading them "
             "was predicted slower than their prefill.", "disk_restores_skipped"),
            (CounterMetricFamily, "disk_blocks_skipped", "KV blocks of those runs.", "disk_blocks_skipped"),
            (GaugeMetricFamily, "disk_read_bytes_per_second", "The disk tier's read throughput as estimated from "
             "its reads (the restore decision's input).", "disk_read_bytes_per_s"),
            (CounterMetricFamily, "disk_read_seconds", "Wall time of the disk tier's batches of block reads (a "
             "restore from disk waits for its batch).", "disk_read_s"),
            (CounterMetricFamily, "disk_reads", "Batches of disk tier block reads timed.", "disk_reads")):
        metric = family(f"meshserve:kv_offload_{name}", doc)
        metric.add_metric([], v(key))
        yield metric


def _kv_transfer_families(s: dict[str, Any]) -> Iterator[Metric]:
    """Prefill/decode disaggregation (disagg/): transfers, bytes and per-transfer latency, blocks held now."""
    from meshserve.disagg.stats import LATENCY_BUCKETS

    def v(key: str) -> float:
        return float(s.get(f"kv_transfer_{key}") or 0)

    count = CounterMetricFamily("meshserve:kv_transfers", "KV transfers by direction and outcome.",
                                labels=["direction", "outcome"])
    count.add_metric(["sent", "ok"], v("sent"))
    count.add_metric(["received", "ok"], v("received"))
    count.add_metric(["any", "failed"], v("failed"))
    count.add_metric(["sent", "expired"], v("expired"))
    nbytes = CounterMetricFamily("meshserve:kv_transfer_bytes", "Bytes of KV blocks moved, by direction.",
                                 labels=["direction"])
    nbytes.add_metric(["sent"], v("sent_bytes"))
    nbytes.add_metric(["received"], v("received_bytes"))
    blocks = GaugeMetricFamily("meshserve:kv_transfer_blocks", "KV blocks held for consumers (producer) or "
                               "allocated to transfers in flight (consumer).", labels=["state"])
    blocks.add_metric(["held"], v("held_blocks"))
    blocks.add_metric(["receiving"], v("receiving_blocks"))
    counts = s.get("kv_transfer_latency_buckets") or [0] * (len(LATENCY_BUCKETS) + 1)
    cumulative, buckets = 0, []
    for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts):
        cumulative += n
        buckets.append((bound, cumulative))
    latency = HistogramMetricFamily("meshserve:kv_transfer_seconds", "Per-request KV transfer time on the "
                                    "consumer: handshake, every layer, scatter into its cache.",
                                    buckets=buckets, sum_value=v("received_s"))
    streamed = CounterMetricFamily("meshserve:kv_transfer_streamed_seconds", "Layer-wise transfers (producer): "
                                   "seconds from each one's first layer sent to its last, in all, and the part "
                                   "of them before its prefill ended (the transfer overlapping compute).",
                                   labels=["part"])
    streamed.add_metric(["total"], v("streamed_s"))
    streamed.add_metric(["during_prefill"], v("streamed_overlap_s"))
    yield from (count, nbytes, blocks, latency, streamed)


def labelled_counter(name: str, doc: str, label: str, values, registry: CollectorRegistry) -> Counter:
    """A counter by one label whose known values are all exported from the first scrape, at 0 (a rate over
    a series that appears only with its first event misses that event)."""
    counter = Counter(name, doc, [label], registry=registry)
    for value in values:
        counter.labels(value)
    return counter


class ServerMetrics:
    """All series of one server; `track()` returns a per-request observer."""

    def __init__(self, request_log: RequestLog | None = None, max_model_len: int | None = None) -> None:
        """max_model_len: the top of the per-request token histograms' buckets."""
        self.request_log = request_log  # --request-log: a line per served prompt (request_log.py)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = labelled_counter("meshserve:requests", "Generation requests by outcome.", "outcome",
                                         OUTCOMES, r)
        self.prompt_tokens = Counter("meshserve:prompt_tokens", "Prompt tokens prefilled: each sequence's (a choice "
                                     "of a prompt), cached ones included, once however often it was preempted.",
                                     registry=r)
        self.generation_tokens = Counter("meshserve:generation_tokens", "Tokens generated and sent.",
                                         registry=r)
        self.ttft = Histogram("meshserve:time_to_first_token_seconds", "Time from the request's arrival at "
                              "the server to each sequence's (a choice of a prompt) first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("meshserve:inter_token_latency_seconds",
                             "Time between successive engine steps that gave a sequence (a choice of a prompt) "
                             "tokens, by the engine's clock (several tokens of one step: one observation).",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("meshserve:e2e_request_latency_seconds", "Time from the request's arrival to "
                             "each sequence's (a choice of a prompt) last token, of sequences that ended by stop "
                             "or length.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.per_request = RequestHistograms(r, max_model_len)  # vLLM's phase and token histograms
        self.rejected = labelled_counter(
            "meshserve:requests_rejected", "Requests refused with 429/503, by reason (the error code: "
            "server_overloaded, slo_unattainable at arrival, slo_shed from the queue, ...).", "reason",
            ("server_overloaded", "slo_unattainable", "slo_shed"), r)
        self.gate_refusals = Counter(
            "meshserve:requests_refused_at_gate", "Requests the API process's gate answered 429 before parsing "
            "them (its predicted TTFT past the target): a subset of requests_rejected; the rest of its "
            "slo_unattainable were refused after parsing, by the engine's own check.", registry=r)
        self.slo = labelled_counter(
            "meshserve:requests_slo", "Finished requests with service-level targets: whether they met them "
            "(TTFT and time per output token). Goodput = rate of met.", "result", ("met", "missed"), r)
        self.admission_margin = Gauge("meshserve:admission_margin", "Fraction of the TTFT target up to which "
                                      "a request's predicted TTFT is admitted, as this API process's controller "
                                      "last set it (multiprocess: per pid).", registry=r, multiprocess_mode="all")
        self.admission_margin_updates = Counter("meshserve:admission_margin_updates", "Updates of the admission "
                                                "margin, from measured TTFTs of admitted requests.", registry=r)
        self.admission_margin_error = Gauge("meshserve:admission_margin_ttft_error", "The p99 of (measured - "
                                            "predicted TTFT) / target of requests admitted near the margin, at the "
                                            "margin's last update (NaN before the first).", registry=r,
                                            multiprocess_mode="all")
        self.startup_seconds = Gauge("meshserve:startup_seconds", "Seconds from the launch of `meshserve serve` "
                                     "to this API process accepting requests (the start-up timeline's total; "
                                     "multiprocess: the slowest process).", registry=r, multiprocess_mode="max")
        self._margin_updates_counted = 0
        self._engine = _EngineStatsCollector()
        r.register(self._engine)

    def watch_admission_margin(self, margin: AdmissionMargin) -> None:
        """Export margin's value, its updates and its last error quantile, now and at each update."""
        self._margin_updates_counted = 0
        self._on_margin_update(margin)
        margin.add_listener(self._on_margin_update)

    def _on_margin_update(self, margin: AdmissionMargin) -> None:
        self.admission_margin.set(margin.value)
        err = margin.last_error_quantile
        self.admission_margin_error.set(float("nan") if err is None else err)
        # the counter follows the controller's own count (updates before watching included)
        self.admission_margin_updates.inc(margin.num_updates - self._margin_updates_counted)
        self._margin_updates_counted = margin.num_updates

    def track(self) -> RequestTracker:
        return RequestTracker(self)

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def render(self, engine_stats: tuple[dict[str, Any], float] | None) -> bytes:
        """The exposition text; engine_stats: (the core's counters, their age in s), or None to keep the last."""
        if engine_stats is not None:
            self._engine.stats, self._engine.age_s = engine_stats
        # one of several API processes: theirs summed, the engine's gauges (the same in each) once
        return multiprocess_metrics.render(self.registry, self._engine)


class RequestTracker:
    """Observes one HTTP request's engine outputs: TTFT, inter-token gaps, token counts, outcome, and
    whether it met its service-level targets (when it has any).

    Like vLLM's, the per-request series count engine requests: each sequence (one choice of one prompt; vLLM
    runs n choices and a batch's prompts as requests of their own) has its TTFT, its prompt tokens and, when
    it ends by stop or length, its end-to-end latency and per-request histograms (request_histograms.py). The
    outcome counter stays one per HTTP request."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        # the engine's clock: TTFT targets count from the request's first ASGI call (before its body was read)
        now = time.monotonic()
        self.arrival_monotonic = ARRIVAL.get() or now
        self.arrival = time.perf_counter() - (now - self.arrival_monotonic)
        self._first: float | None = None
        self._last: float | None = None
        self._prompt_seen: dict[int, int] = {}  # prompt index -> its prompt tokens
        self._num_tokens: dict[tuple[int, int], int] = {}  # (prompt index, choice index) -> tokens so far
        self._last_token: dict[tuple[int, int], float] = {}  # (prompt index, choice index) -> its last output
        self._last_step: dict[tuple[int, int], float] = {}  # and the core's time of its last step with tokens
        self._num_finished: dict[int, int] = {}  # prompt index -> its choices ended by stop or length
        self._done = False
        self.ttft_target_s: float | None = None
        self.tpot_target_s: float | None = None

    def observe(self, prompt_index: int, out: RequestOutput) -> None:
        """Count one DELTA output of the request's prompt_index-th prompt."""
        now = time.perf_counter()
        new = 0
        self._prompt_seen.setdefault(prompt_index, len(out.prompt_token_ids))
        for c in out.outputs:
            key = (prompt_index, c.index)
            n = len(c.token_ids)
            seen = self._num_tokens.get(key)
            if seen is None:  # the sequence's first output: its prompt was prefilled (once, preempted or not)
                self.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
            self._num_tokens[key] = (seen or 0) + n
            new += n
            if n and not seen:
                self.metrics.ttft.observe(now - self.arrival)
            if n:
                self._observe_gaps(key, c.token_ids, c.step_times, now)
            if c.finish_reason in ("stop", "length"):
                self.metrics.e2e.observe(now - self.arrival)
                self._observe_finished(prompt_index, key, c.stats)
        if new <= 0:
            return
        self.metrics.generation_tokens.inc(new)
        if self._last is None:
            self._first = now
        self._last = now

    def _observe_finished(self, prompt_index: int, key: tuple[int, int], stats: SequenceStats | None) -> None:
        """A sequence ended by stop or length: its per-request histograms, and its prompt's once all its n ended."""
        self.metrics.per_request.observe(self._prompt_seen[prompt_index], self._num_tokens[key], stats)
        done = self._num_finished[prompt_index] = self._num_finished.get(prompt_index, 0) + 1
        if stats is not None and done == stats.n:
            most = max(n for (p, _c), n in self._num_tokens.items() if p == prompt_index)
            self.metrics.per_request.observe_prompt(stats.n, most)

    def _observe_gaps(self, key: tuple[int, int], token_ids: list[int], step_times: list[float] | None,
                      now: float) -> None:
        """Inter-token latency of one sequence (one choice of one prompt), as vLLM measures it: one observation
        per engine step that gave it tokens, after the step of its first, timed from its own previous such
        step by the core's clock. So tokens of one step (accepted proposals) are one gap, not several, and
        steps that reached a lagging stream folded together keep their own gaps."""
        if step_times is not None:
            last = self._last_step.get(key)
            for t in step_times:
                if last is not None:
                    self.metrics.itl.observe(t - last)
                last = t
            if last is not None:
                self._last_step[key] = last
            return
        # outputs without the core's times (built elsewhere): the gap since the sequence's last output, spread
        # over its tokens
        n = len(token_ids)
        last = self._last_token.get(key)
        gap, count = (0.0, n - 1) if last is None else ((now - last) / n, n)
        for _ in range(count):
            self.metrics.itl.observe(gap)
        self._last_token[key] = now

    def fail(self, exc: BaseException) -> None:
        """The request ended before or while producing a response."""
        if isinstance(exc, asyncio.CancelledError):
            self.finish("abort")
            return
        outcome = outcome_of_error(exc)
        if outcome == "rejected":
            self.metrics.rejected.labels(getattr(exc, "code", None) or "other").inc()
        self.finish(outcome)

    def finish(self, outcome: str) -> None:
        if self._done:
            return
        self._done = True
        self.metrics.count(outcome)
        if outcome in ("stop", "length"):
            self._count_service_level()
            if self.metrics.request_log is not None:
                self._log(outcome)

    def _log(self, outcome: str) -> None:
        """One request-log line per prompt: its tokens and the most tokens of its choices."""
        arrival = unix_time_of(self.arrival)
        ttft = None if self._first is None else self._first - self.arrival
        e2e = time.perf_counter() - self.arrival
        for prompt_index, prompt_tokens in sorted(self._prompt_seen.items()):
            out = max((n for (p, _c), n in self._num_tokens.items() if p == prompt_index), default=0)
            self.metrics.request_log.write(arrival, prompt_tokens, out, outcome, ttft, e2e)

    def _count_service_level(self) -> None:
        if self.ttft_target_s is None and self.tpot_target_s is None or self._first is None:
            return
        ttft = self._first - self.arrival
        tokens = max(self._num_tokens.values(), default=0)
        tpot = (self._last - self._first) / (tokens - 1) if tokens > 1 else 0.0
        met = ((self.ttft_target_s is None or ttft <= self.ttft_target_s)
               and (self.tpot_target_s is None or tpot <= self.tpot_target_s))
        self.metrics.slo.labels("met" if met else "missed").inc()


def outcome_of_error(exc: BaseException) -> str:
    """The metrics outcome of a request that failed before producing a response."""
    if isinstance(exc, RetryableError):
        return "rejected"
    if isinstance(exc, MeshserveError) and exc.http_status < 500:
        return "invalid"  # bad arguments, unknown model, ...
    return "error"


def outcome_of(outputs: list[RequestOutput]) -> str:
    """'length' if any choice ran out of tokens, 'abort' if any was aborted, else 'stop'."""
    reasons = {c.finish_reason for out in outputs for c in out.outputs}
    for r in ("abort", "length"):
        if r in reasons:
            return r
    return "stop"
