"""Prometheus metrics of the server, each app with its own CollectorRegistry.

Every series vLLM 0.26 exports that meshserve can produce truthfully has vLLM's name (`vllm:`), type, labels
(model_name: the first served model name; engine: the data-parallel core, "0" without data parallelism) and
buckets, so vLLM's dashboards and alerts work unchanged; what is meshserve's own is `meshserve:` (deploy/grafana/
README.md has the table of both). Request-level series (tokens, finish reasons, latency histograms) are observed
by the handlers as they stream, labelled with the core that ran each sequence; engine-level series (queue, KV
cache, prefix cache, preemptions, tokens per iteration) are the counters each engine core published with its last
step (a scrape never waits on the core), with their age as a gauge of its own.
With several API processes (PROMETHEUS_MULTIPROC_DIR set before import) request series are summed across them.

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
from prometheus_client.utils import floatToGoString

from meshserve.engine.messages import ITERATION_TOKENS_BUCKETS
from meshserve.errors import MeshserveError, RetryableError
from meshserve.outputs import RequestOutput, SequenceStats
from meshserve.serve import multiprocess_metrics
from meshserve.serve.frontend_load import ARRIVAL
from meshserve.serve.request_histograms import LABELS, PHASE_BUCKETS, TPOT_BUCKETS, RequestHistograms
from meshserve.serve.request_log import RequestLog, unix_time_of

if TYPE_CHECKING:
    from meshserve.engine.admission_margin import AdmissionMargin

# Outcomes of a generation request: how its choices finished, or why it produced none.
OUTCOMES = ("stop", "length", "abort", "rejected", "invalid", "error")
# vllm:request_success's finished_reason values meshserve's sequences can end with (vLLM's also has error, a KV
# load failure, and repetition, a detector meshserve has not)
FINISHED_REASONS = ("stop", "length", "abort")
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")  # vllm:prompt_tokens_by_source

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = TPOT_BUCKETS
E2E_BUCKETS = PHASE_BUCKETS


class _EngineStatsCollector(Collector):
    """Turns the cores' last published counters into gauge, counter and histogram families."""

    def __init__(self, model_name: str = "meshserve", cache_config: dict[str, str] | None = None) -> None:
        self.model_name = model_name
        self.cache_config = cache_config or {}  # vllm:cache_config_info's labels (CoreInfo.cache_config)
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
        # data parallel: each core's own counters (labelled engine="i"); else the one core's, with the requests
        # sent to it since its last stats counted as waiting
        yield from _vllm_engine_families(self.model_name, s.get("engines") or [s], self.cache_config)
        gauges = [
            ("meshserve:prefix_cache_hit_rate", ("Prefix cache hit tokens (KV offload tiers' included) / queried "
             "tokens since start (0-1)."), "prefix_cache_hit_rate"),
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
        c = CounterMetricFamily("meshserve:requests_shed", "Queued requests dropped by the engine because their "
                                "time-to-first-token target could no longer be met.")
        c.add_metric([], float(s.get("num_shed") or 0))
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


def _vllm_engine_families(model_name: str, engines: list[dict[str, Any]],
                          cache_config: dict[str, str]) -> Iterator[Metric]:
    """vLLM's per-engine series (PrometheusStatLogger's scheduler and iteration stats), one sample per core."""

    def labels(i: int) -> list[str]:
        return [model_name, str(i)]

    def v(e: dict[str, Any], key: str) -> float:
        return float(e.get(key) or 0)

    def family(kind, name: str, doc: str, value) -> Metric:
        metric = kind(name, doc, labels=list(LABELS))
        for i, e in enumerate(engines):
            metric.add_metric(labels(i), float(value(e)))
        return metric

    def waiting(e: dict[str, Any]) -> float:  # vLLM's waiting + skipped waiting (deferred)
        return v(e, "num_waiting") + v(e, "num_waiting_for_kv")

    def deferred(e: dict[str, Any]) -> float:  # a grammar compiling, a prefill's KV on its way
        return v(e, "num_waiting_for_grammar") + v(e, "num_waiting_for_kv")

    yield family(GaugeMetricFamily, "vllm:num_requests_running", "Number of requests in model execution batches.",
                 lambda e: v(e, "num_running"))
    yield family(GaugeMetricFamily, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                 waiting)
    by_reason = GaugeMetricFamily("vllm:num_requests_waiting_by_reason", "Number of waiting requests by reason. "
                                  "Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = "
                                  "deferred by transient constraints (a grammar compiling, a disaggregated "
                                  "prefill's KV on its way). Sum of all reasons equals vllm:num_requests_waiting.",
                                  labels=[*LABELS, "reason"])
    for i, e in enumerate(engines):
        by_reason.add_metric([*labels(i), "capacity"], waiting(e) - deferred(e))
        by_reason.add_metric([*labels(i), "deferred"], deferred(e))
    yield by_reason
    yield family(GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                 lambda e: v(e, "kv_cache_usage"))
    yield family(CounterMetricFamily, "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of "
                 "queried tokens.", lambda e: v(e, "prefix_cache_queries"))
    yield family(CounterMetricFamily, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached "
                 "tokens (the GPU cache's; those restored from a KV offload tier are external hits).",
                 lambda e: v(e, "prefix_cache_hits") - v(e, "prefix_cache_restored_hits"))
    yield family(CounterMetricFamily, "vllm:external_prefix_cache_queries", "External prefix cache queries (KV "
                 "offload tiers, a disaggregated prefill's transfer), in terms of number of queried tokens.",
                 lambda e: v(e, "prefix_cache_external_queries"))
    yield family(CounterMetricFamily, "vllm:external_prefix_cache_hits", "External prefix cache hits (KV offload "
                 "tiers, a disaggregated prefill's transfer), in terms of number of cached tokens.",
                 lambda e: v(e, "prefix_cache_external_hits"))
    yield family(CounterMetricFamily, "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                 lambda e: v(e, "num_preemptions"))
    iteration = HistogramMetricFamily("vllm:iteration_tokens_total", "Histogram of number of tokens per "
                                      "engine_step.", labels=list(LABELS))
    for i, e in enumerate(engines):
        counts = e.get("iteration_tokens") or [0] * (len(ITERATION_TOKENS_BUCKETS) + 2)  # (the sum last)
        iteration.add_metric(labels(i), _cumulative(ITERATION_TOKENS_BUCKETS, counts[:-1]), sum_value=counts[-1])
    yield iteration
    if any(e.get("spec_num_accepted_tokens_per_pos") for e in engines):  # speculative decoding configured
        for name, doc, key in (
                ("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", "spec_num_drafts"),
                ("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", "spec_num_draft_tokens"),
                ("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.", "spec_num_accepted_tokens")):
            yield family(CounterMetricFamily, name, doc, lambda e, key=key: v(e, key))
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos", "Accepted tokens per draft "
                                      "position.", labels=[*LABELS, "position"])
        for i, e in enumerate(engines):
            for pos, n in enumerate(e.get("spec_num_accepted_tokens_per_pos") or []):
                per_pos.add_metric([*labels(i), str(pos)], float(n))
        yield per_pos
    if cache_config:
        keys = sorted(cache_config)
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=[*keys, "engine"])
        for i, e in enumerate(engines):
            values = dict(cache_config)
            if len(engines) > 1 and e.get("num_blocks"):
                values["num_gpu_blocks"] = str(e["num_blocks"])  # each core sized its own pool
            info.add_metric([values[k] for k in keys] + [str(i)], 1.0)
        yield info


def _cumulative(bounds, counts) -> list[tuple[str, float]]:
    """(le, cumulative count) pairs of a histogram from its per-bucket counts (+Inf last), le written as
    prometheus_client writes a Histogram's."""
    out, total = [], 0
    for bound, n in zip((*map(floatToGoString, bounds), "+Inf"), counts):
        total += n
        out.append((bound, float(total)))
    return out


def _per_engine_families(engines: list[dict[str, Any]]) -> Iterator[Metric]:
    """Data parallel: each engine core's predicted queue wait, labelled engine="i" (the unlabelled gauge is the
    least loaded core's, the one a new request goes to; running, waiting and KV use per core are vLLM's series)."""
    if not engines:
        return
    g = GaugeMetricFamily("meshserve:engine_queue_wait_predicted_seconds", "Predicted wait of a request joining "
                          "this core now.", labels=["engine"])
    for i, e in enumerate(engines):
        g.add_metric([str(i)], float(e.get("queue_wait_s") or 0.0))
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

    def __init__(self, request_log: RequestLog | None = None, max_model_len: int | None = None,
                 model_name: str = "meshserve", num_engines: int = 1,
                 cache_config: dict[str, str] | None = None) -> None:
        """max_model_len: the top of the per-request token histograms' buckets; model_name: vLLM's model_name
        label (the first served model name); num_engines: the data-parallel cores (engine label "0".. each of
        whose series is exported from the first scrape, as vLLM's); cache_config: vllm:cache_config_info's
        labels (CoreInfo.cache_config)."""
        self.request_log = request_log  # --request-log: a line per served prompt (request_log.py)
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = labelled_counter("meshserve:requests", "Generation requests by outcome.", "outcome",
                                         OUTCOMES, r)
        # vLLM's per-engine request series: per sequence (a choice of a prompt), labelled with its core
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed: each sequence's "
                                     "prompt tokens, cached ones included, once (with its first token).", LABELS,
                                     registry=r)
        self.prompt_tokens_by_source = Counter("vllm:prompt_tokens_by_source", "Number of prompt tokens by source.",
                                               [*LABELS, "source"], registry=r)
        self.prompt_tokens_cached = Counter("vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + "
                                            "external).", LABELS, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         LABELS, registry=r)
        self.request_success = Counter("vllm:request_success", "Count of successfully processed requests: "
                                       "sequences (a choice of a prompt) by the reason they finished.",
                                       [*LABELS, "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds: "
                              "from the request's arrival at the server to each sequence's first token.", LABELS,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds: "
                             "between successive engine steps that gave a sequence tokens, by the engine's clock "
                             "(several tokens of one step: one observation).", LABELS, buckets=ITL_BUCKETS,
                             registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds: "
                             "from the request's arrival to each finished sequence's last token.", LABELS,
                             buckets=E2E_BUCKETS, registry=r)
        self.per_request = RequestHistograms(r, max_model_len)  # vLLM's phase and token histograms
        for engine in range(max(num_engines, 1)):  # every series from the first scrape, at 0, as vLLM's
            labels = self.labels(engine)
            for metric in (self.prompt_tokens, self.prompt_tokens_cached, self.generation_tokens, self.ttft,
                           self.itl, self.e2e):
                metric.labels(*labels)
            for source in PROMPT_SOURCES:
                self.prompt_tokens_by_source.labels(*labels, source)
            for reason in FINISHED_REASONS:
                self.request_success.labels(*labels, reason)
            self.per_request.register_engine(labels)
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
        self._engine = _EngineStatsCollector(model_name, cache_config)
        r.register(self._engine)

    def labels(self, engine: int) -> tuple[str, str]:
        """vLLM's (model_name, engine) label values of a core's series."""
        return self.model_name, str(engine)

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
    """Observes one HTTP request's engine outputs: TTFT, inter-token gaps, token counts, finish reasons, outcome,
    and whether it met its service-level targets (when it has any).

    Like vLLM's, the per-request series count engine requests: each sequence (one choice of one prompt; vLLM
    runs n choices and a batch's prompts as requests of their own) has its TTFT, its prompt tokens (with its
    first token) and, when it finishes, its finish reason, end-to-end latency and per-request histograms
    (request_histograms.py), all labelled with the core that ran it. The outcome counter stays one per HTTP
    request."""

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
        self._labels: dict[tuple[int, int], tuple[str, str]] = {}  # (prompt index, choice index) -> its labels
        self._last_token: dict[tuple[int, int], float] = {}  # (prompt index, choice index) -> its last output
        self._last_step: dict[tuple[int, int], float] = {}  # and the core's time of its last step with tokens
        self._num_finished: dict[int, int] = {}  # prompt index -> its choices finished
        self._done = False
        self.ttft_target_s: float | None = None
        self.tpot_target_s: float | None = None

    def observe(self, prompt_index: int, out: RequestOutput) -> None:
        """Count one DELTA output of the request's prompt_index-th prompt."""
        now = time.perf_counter()
        m = self.metrics
        new = 0
        self._prompt_seen.setdefault(prompt_index, len(out.prompt_token_ids))
        for c in out.outputs:
            key = (prompt_index, c.index)
            n = len(c.token_ids)
            stats = c.stats
            labels = self._labels.get(key)
            if labels is None:
                labels = self._labels[key] = m.labels(stats.engine_index if stats is not None else 0)
            seen = self._num_tokens.get(key)
            self._num_tokens[key] = (seen or 0) + n
            new += n
            if n and not seen:  # its first token: its prompt was prefilled (once, preempted or not)
                m.ttft.labels(*labels).observe(now - self.arrival)
                self._count_prompt(labels, len(out.prompt_token_ids), stats)
            if n:
                m.generation_tokens.labels(*labels).inc(n)
                self._observe_gaps(key, labels, c.token_ids, c.step_times, now)
            if c.finish_reason in FINISHED_REASONS:
                m.request_success.labels(*labels, c.finish_reason).inc()
                m.e2e.labels(*labels).observe(now - self.arrival)
                self._observe_finished(prompt_index, key, stats)
        if new <= 0:
            return
        if self._last is None:
            self._first = now
        self._last = now

    def _count_prompt(self, labels: tuple[str, str], prompt_tokens: int, stats: SequenceStats | None) -> None:
        """A sequence's prompt tokens, by where their KV came from (vLLM's: computed, from the GPU prefix cache,
        from outside it: a KV offload tier or a disaggregated prefill)."""
        m = self.metrics
        cached = min(stats.num_cached_tokens, prompt_tokens) if stats is not None else 0
        external = min(stats.num_external_cached_tokens, cached) if stats is not None else 0
        m.prompt_tokens.labels(*labels).inc(prompt_tokens)
        m.prompt_tokens_cached.labels(*labels).inc(cached)
        for source, count in zip(PROMPT_SOURCES, (prompt_tokens - cached, cached - external, external)):
            m.prompt_tokens_by_source.labels(*labels, source).inc(count)

    def _observe_finished(self, prompt_index: int, key: tuple[int, int], stats: SequenceStats | None) -> None:
        """A sequence finished: its per-request histograms, and its prompt's once all its n finished."""
        labels = self._labels[key]
        self.metrics.per_request.observe(labels, self._prompt_seen[prompt_index], self._num_tokens[key], stats)
        done = self._num_finished[prompt_index] = self._num_finished.get(prompt_index, 0) + 1
        if stats is not None and done == stats.n:
            most = max(n for (p, _c), n in self._num_tokens.items() if p == prompt_index)
            self.metrics.per_request.observe_prompt(labels, stats.n, most)

    def _observe_gaps(self, key: tuple[int, int], labels: tuple[str, str], token_ids: list[int],
                      step_times: list[float] | None, now: float) -> None:
        """Inter-token latency of one sequence (one choice of one prompt), as vLLM measures it: one observation
        per engine step that gave it tokens, after the step of its first, timed from its own previous such
        step by the core's clock. So tokens of one step (accepted proposals) are one gap, not several, and
        steps that reached a lagging stream folded together keep their own gaps."""
        itl = self.metrics.itl.labels(*labels)
        if step_times is not None:
            last = self._last_step.get(key)
            for t in step_times:
                if last is not None:
                    itl.observe(t - last)
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
            itl.observe(gap)
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
