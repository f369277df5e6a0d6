"""/metrics as vLLM 0.26's: every vLLM series meshserve exports (deploy/grafana/README.md's table, rows "same"
and "added") with vLLM's name, type, label names and values, and buckets, read off a live tiny server after a few
requests; nothing under vllm: that vLLM does not define; and the series added for parity move as they should.

The expected table is written out here (CI has no vLLM), from vLLM 0.26's vllm/v1/metrics/loggers.py
(PrometheusStatLogger), vllm/v1/spec_decode/metrics.py and vllm/config/cache.py. Counters are named without
`_total` (prometheus_client's family names; the samples end in `_total`), as vLLM declares them.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import MODEL, start_server, wait_idle

MAX_MODEL_LEN = 512  # the tiny engine's (conftest.make_engine)
ENGINE = ("model_name", "engine")


def build_1_2_5_buckets(max_value: int) -> list[float]:
    """vLLM's build_1_2_5_buckets."""
    out, exponent = [], 0
    while True:
        for m in (1, 2, 5):
            if m * 10**exponent > max_value:
                return [float(b) for b in out]
            out.append(m * 10**exponent)
        exponent += 1


TOKENS = build_1_2_5_buckets(MAX_MODEL_LEN)
TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
        160.0, 640.0, 2560.0]
ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
           960.0, 1920.0, 7680.0]
ITERATION = [1.0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]

# vLLM name -> (type, label names, buckets or None, {label: the values vLLM exports})
SAME = {
    "vllm:num_requests_running": ("gauge", ENGINE, None, {}),
    "vllm:num_requests_waiting": ("gauge", ENGINE, None, {}),
    "vllm:kv_cache_usage_perc": ("gauge", ENGINE, None, {}),
    "vllm:prefix_cache_queries": ("counter", ENGINE, None, {}),
    "vllm:prefix_cache_hits": ("counter", ENGINE, None, {}),
    "vllm:num_preemptions": ("counter", ENGINE, None, {}),
    "vllm:prompt_tokens": ("counter", ENGINE, None, {}),
    "vllm:generation_tokens": ("counter", ENGINE, None, {}),
    "vllm:request_prompt_tokens": ("histogram", ENGINE, TOKENS, {}),
    "vllm:request_generation_tokens": ("histogram", ENGINE, TOKENS, {}),
    "vllm:request_max_num_generation_tokens": ("histogram", ENGINE, TOKENS, {}),
    "vllm:request_params_n": ("histogram", ENGINE, [1.0, 2, 5, 10, 20], {}),
    "vllm:request_params_max_tokens": ("histogram", ENGINE, TOKENS, {}),
    "vllm:time_to_first_token_seconds": ("histogram", ENGINE, TTFT, {}),
    "vllm:inter_token_latency_seconds": ("histogram", ENGINE, ITL, {}),
    "vllm:request_time_per_output_token_seconds": ("histogram", ENGINE, ITL, {}),
    "vllm:e2e_request_latency_seconds": ("histogram", ENGINE, LATENCY, {}),
    "vllm:request_queue_time_seconds": ("histogram", ENGINE, LATENCY, {}),
    "vllm:request_inference_time_seconds": ("histogram", ENGINE, LATENCY, {}),
    "vllm:request_prefill_time_seconds": ("histogram", ENGINE, LATENCY, {}),
    "vllm:request_decode_time_seconds": ("histogram", ENGINE, LATENCY, {}),
    "vllm:request_prefill_kv_computed_tokens": ("histogram", ENGINE, TOKENS, {}),
}
ADDED = {
    "vllm:num_requests_waiting_by_reason": ("gauge", (*ENGINE, "reason"), None, {"reason": {"capacity", "deferred"}}),
    "vllm:external_prefix_cache_queries": ("counter", ENGINE, None, {}),
    "vllm:external_prefix_cache_hits": ("counter", ENGINE, None, {}),
    "vllm:prompt_tokens_by_source": ("counter", (*ENGINE, "source"), None,
                                     {"source": {"local_compute", "local_cache_hit", "external_kv_transfer"}}),
    "vllm:prompt_tokens_cached": ("counter", ENGINE, None, {}),
    # vLLM's finished_reason also has error (a KV load failure) and repetition (its repetition detector):
    # meshserve's sequences never end so, and those series are left out rather than held at 0
    "vllm:request_success": ("counter", (*ENGINE, "finished_reason"), None,
                             {"finished_reason": {"stop", "length", "abort"}}),
    "vllm:iteration_tokens_total": ("histogram", ENGINE, ITERATION, {}),
}
# only with speculative decoding configured, as vLLM's
SPEC = {
    "vllm:spec_decode_num_drafts": ("counter", ENGINE, None, {}),
    "vllm:spec_decode_num_draft_tokens": ("counter", ENGINE, None, {}),
    "vllm:spec_decode_num_accepted_tokens": ("counter", ENGINE, None, {}),
    "vllm:spec_decode_num_accepted_tokens_per_pos": ("counter", (*ENGINE, "position"), None, {}),
}
# vllm:cache_config_info's labels are vLLM's CacheConfig fields (+ engine); meshserve's are those it has
VLLM_CACHE_CONFIG_FIELDS = {
    "block_size", "user_specified_block_size", "user_specified_mamba_block_size", "prefix_match_unit",
    "gpu_memory_utilization", "cache_dtype", "is_attention_free", "num_gpu_blocks_override", "sliding_window",
    "enable_prefix_caching", "prefix_caching_hash_algo", "calculate_kv_scales", "kv_cache_dtype_skip_layers",
    "mamba_page_size_padded", "skip_page_size_padded", "mamba_block_size", "mamba_cache_dtype",
    "mamba_ssm_cache_dtype", "mamba_cache_mode", "num_gpu_blocks", "num_cpu_blocks", "kv_cache_size_tokens",
    "kv_cache_max_concurrency", "kv_sharing_fast_prefill", "kv_cache_memory_bytes", "kv_offloading_size",
    "kv_offloading_backend", "_block_size_resolved",
}


def families(text: str) -> dict:
    """vllm: families of an exposition (the `_created` series prometheus_client writes beside counters and
    histograms, vLLM's as meshserve's, are families of their own to the text parser: left out)."""
    return {f.name: f for f in text_string_to_metric_families(text)
            if f.name.startswith("vllm:") and not f.name.endswith("_created")}


def check_family(family, kind: str, labels: tuple[str, ...], buckets, values: dict[str, set[str]]) -> None:
    assert family.type == kind, (family.name, family.type)
    samples = [s for s in family.samples if not s.name.endswith("_created")]
    assert samples, family.name
    for s in samples:
        assert set(s.labels) - {"le"} == set(labels), (family.name, s.labels)
    for label, want in values.items():
        assert {s.labels[label] for s in samples} == want, (family.name, label)
    if buckets is not None:
        les = [s.labels["le"] for s in samples if s.name.endswith("_bucket") and s.labels["engine"] == "0"]
        assert les[-1] == "+Inf" and [float(le) for le in les[:-1]] == [float(b) for b in buckets], family.name


def value(fams: dict, name: str, sample: str | None = None, **labels) -> float:
    """The sum of name's samples (sample: e.g. name + '_sum') whose labels include labels."""
    sample = sample or (name + "_total" if fams[name].type == "counter" else name)
    return sum(s.value for s in fams[name].samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def scraped(tiny_engine):
    """/metrics before and after: a prompt twice with n=2 (the second time its full blocks come from the prefix
    cache), a streamed chat; 5 sequences, every one ending by length."""
    from meshserve.serve.config import ServeConfig

    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL]))
    prompt = [(53 * i) % 300 + 30 for i in range(40)]  # unlike other tests' prompts: nothing cached at first
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            wait_idle(tiny_engine)
            before = http.get("/metrics").text
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "ignore_eos": True, "temperature": 0}
            cached = []
            for n in (2, 2):
                r = http.post("/v1/completions", json={**body, "n": n})
                assert r.status_code == 200
                cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
                wait_idle(tiny_engine)
            with http.stream("POST", "/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
                    "ignore_eos": True, "stream": True}) as s:
                assert s.status_code == 200 and list(s.iter_lines())
            wait_idle(tiny_engine)
            after = http.get("/metrics").text
    finally:
        srv.stop()
    return families(before), families(after), cached, len(prompt)


def test_every_series_as_vllm_declares_it(scraped):
    _, fams, _, _ = scraped
    for name, (kind, labels, buckets, values) in {**SAME, **ADDED}.items():
        assert name in fams, name
        check_family(fams[name], kind, labels, buckets, values)
    assert {s.labels["model_name"] for f in fams.values() for s in f.samples if "model_name" in s.labels} == {MODEL}
    assert {s.labels["engine"] for f in fams.values() for s in f.samples} == {"0"}
    # nothing under vLLM's prefix that vLLM does not define (spec decode: not configured here)
    assert set(fams) - set(SAME) - set(ADDED) == {"vllm:cache_config_info"}


def test_cache_config_info_is_vllm_s_info_gauge(scraped, tiny_engine):
    _, fams, _, _ = scraped
    info = fams["vllm:cache_config_info"]
    assert info.type == "gauge"
    (s,) = info.samples
    assert s.value == 1.0 and "engine" in s.labels and "model_name" not in s.labels
    assert set(s.labels) - {"engine"} <= VLLM_CACHE_CONFIG_FIELDS
    info_of = tiny_engine.core_client.info
    assert s.labels["num_gpu_blocks"] == str(info_of.num_blocks)
    assert s.labels["block_size"] == str(info_of.block_size)
    assert s.labels["enable_prefix_caching"] == "True"


def test_added_series_move_as_vllm_s(scraped):
    before, after, cached, prompt_len = scraped

    def delta(name: str, sample: str | None = None, **labels) -> float:
        return value(after, name, sample, **labels) - value(before, name, sample, **labels)

    assert cached[0] == 0 and 0 < cached[1] < prompt_len  # the repeat found its full blocks cached
    sequences = 5
    assert delta("vllm:request_success", finished_reason="length") == sequences
    assert delta("vllm:request_success", finished_reason="stop") == 0
    assert delta("vllm:request_success", finished_reason="abort") == 0
    # prompt tokens by where their KV came from add up to vllm:prompt_tokens (vLLM's invariant); the cached
    # ones are vllm:prompt_tokens_cached, the computed ones the sum of request_prefill_kv_computed_tokens
    prompt = delta("vllm:prompt_tokens")
    by_source = {src: delta("vllm:prompt_tokens_by_source", source=src)
                 for src in ("local_compute", "local_cache_hit", "external_kv_transfer")}
    assert sum(by_source.values()) == prompt > 4 * prompt_len
    assert by_source["external_kv_transfer"] == 0  # no offload tier, no disaggregated prefill
    assert by_source["local_cache_hit"] == delta("vllm:prompt_tokens_cached") >= 2 * cached[1]
    computed = delta("vllm:request_prefill_kv_computed_tokens", "vllm:request_prefill_kv_computed_tokens_sum")
    assert by_source["local_compute"] == computed
    # the GPU prefix cache's hits are local; nothing was asked of an external cache
    assert delta("vllm:prefix_cache_hits") == by_source["local_cache_hit"]
    assert delta("vllm:external_prefix_cache_queries") == delta("vllm:external_prefix_cache_hits") == 0
    # tokens per iteration: each batch of outputs' new tokens and the prompt tokens its first tokens computed
    generated = delta("vllm:generation_tokens")
    assert generated == 2 * 2 * 4 + 3
    assert delta("vllm:iteration_tokens_total", "vllm:iteration_tokens_total_sum") == generated + computed
    steps = delta("vllm:iteration_tokens_total", "vllm:iteration_tokens_total_count")
    assert 0 < steps <= generated  # (a batch: one step's outputs, or two read back together)
    # idle: nothing waits, for any reason
    assert value(after, "vllm:num_requests_waiting_by_reason") == value(after, "vllm:num_requests_waiting") == 0


def test_waiting_by_reason_and_external_prefix_cache_from_the_core_s_counters():
    """What the engine collector makes of a core's counters: waiting = vLLM's waiting + deferred (grammars
    compiling, prompts whose KV a prefill sends), by reason; GPU prefix hits without the offload tiers' restores,
    which are external hits."""
    from meshserve.serve.metrics import ServerMetrics

    stats = {"num_running": 2, "num_waiting": 5, "num_waiting_for_grammar": 2, "num_waiting_for_kv": 1,
             "prefix_cache_queries": 100, "prefix_cache_hits": 60, "prefix_cache_restored_hits": 20,
             "prefix_cache_external_queries": 50, "prefix_cache_external_hits": 30}
    fams = families(ServerMetrics(model_name="m").render((stats, 0.0)).decode())
    assert value(fams, "vllm:num_requests_waiting") == 6
    assert value(fams, "vllm:num_requests_waiting_by_reason", reason="capacity") == 3
    assert value(fams, "vllm:num_requests_waiting_by_reason", reason="deferred") == 3
    assert value(fams, "vllm:prefix_cache_hits") == 40
    assert value(fams, "vllm:external_prefix_cache_queries") == 50
    assert value(fams, "vllm:external_prefix_cache_hits") == 30


def test_spec_decode_and_data_parallel_series():
    """Speculative decoding's counters (when configured) and every per-engine series, one per core."""
    from meshserve.serve.metrics import ServerMetrics

    core = {"num_running": 1, "spec_num_drafts": 3, "spec_num_draft_tokens": 6, "spec_num_accepted_tokens": 4,
            "spec_num_accepted_tokens_per_pos": [3, 1], "iteration_tokens": [0, 2] + [0] * 12 + [9]}
    metrics = ServerMetrics(max_model_len=MAX_MODEL_LEN, model_name="m", num_engines=2,
                            cache_config={"block_size": "16", "num_gpu_blocks": "8"})
    fams = families(metrics.render(({"engines": [core, {**core, "num_blocks": 7}]}, 0.0)).decode())
    for name, (kind, labels, buckets, values) in {**SAME, **ADDED, **SPEC}.items():
        check_family(fams[name], kind, labels, buckets, values)  # (every series from the first scrape, at 0)
        assert {s.labels["engine"] for s in fams[name].samples} == {"0", "1"}, name
    assert value(fams, "vllm:spec_decode_num_accepted_tokens_per_pos", position="1", engine="1") == 1
    assert value(fams, "vllm:iteration_tokens_total", "vllm:iteration_tokens_total_count", engine="0") == 2
    assert value(fams, "vllm:iteration_tokens_total", "vllm:iteration_tokens_total_sum", engine="1") == 9
    blocks = {s.labels["engine"]: s.labels["num_gpu_blocks"] for s in fams["vllm:cache_config_info"].samples}
    assert blocks == {"0": "8", "1": "7"}  # each core's own pool


def test_sequences_are_labelled_with_the_core_that_ran_them():
    """Data parallel: a sequence's request series carry the engine its outputs came from."""
    from meshserve.outputs import CompletionOutput, RequestOutput, SequenceStats
    from meshserve.serve.metrics import ServerMetrics

    metrics = ServerMetrics(model_name="m", num_engines=2)
    tracker = metrics.track()
    stats = SequenceStats(4, queued_time=1.0, first_scheduled_time=1.1, first_token_time=1.2, last_token_time=1.3,
                          num_cached_tokens=4, num_external_cached_tokens=4, engine_index=1)
    tracker.observe(0, RequestOutput("r", None, [1] * 6, [CompletionOutput(0, "", [7, 7], finish_reason="stop",
                                                                           stats=stats)], finished=True))
    fams = families(metrics.render(None).decode())
    assert value(fams, "vllm:generation_tokens", engine="1") == 2 and value(fams, "vllm:generation_tokens",
                                                                             engine="0") == 0
    assert value(fams, "vllm:request_success", engine="1", finished_reason="stop") == 1
    assert value(fams, "vllm:prompt_tokens_by_source", engine="1", source="external_kv_transfer") == 4
    assert value(fams, "vllm:prompt_tokens_by_source", engine="1", source="local_compute") == 2
    assert value(fams, "vllm:prompt_tokens_by_source", engine="1", source="local_cache_hit") == 0
    assert value(fams, "vllm:request_queue_time_seconds", "vllm:request_queue_time_seconds_count", engine="1") == 1


def test_router_reads_the_waiting_queue_of_vllm_and_older_meshserve_replicas():
    from meshserve.router.health import parse_num_waiting

    dp = ('vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
          'vllm:num_requests_waiting{engine="1",model_name="m"} 3.0\n'
          'vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 2.0\n')
    assert parse_num_waiting(dp) == 5
    assert parse_num_waiting("meshserve:num_requests_waiting 4.0\n") == 4
    assert parse_num_waiting("meshserve:num_requests_running 4.0\n") is None


def test_prefixes_restored_from_an_offload_tier_are_external_hits(tiny_model_dir):
    """As vLLM counts its offloading connector's loads: tokens restored from the CPU tier are external prefix-cache
    hits (and external_kv_transfer prompt tokens), not the GPU prefix cache's."""
    from meshserve import LLM, SamplingParams
    from meshserve.serve.metrics import ServerMetrics
    from tests.engine.kv_offload.test_kv_offload_engine import gib, prompts

    # 24 GPU blocks of 4 tokens: each 40-token prompt's 9 full blocks are evicted by the next ones before it
    # comes back, and restored from the CPU tier
    llm = LLM(model=tiny_model_dir("llama"), block_size=4, num_gpu_blocks_override=24, kv_offloading_size=gib(64))
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    try:
        outs = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0]
                for _ in range(2) for p in prompts()]
        stats = llm.engine.stats()
    finally:
        llm.shutdown()
    revisits = [o.stats for o in outs[4:]]
    assert all(s.num_external_cached_tokens == s.num_cached_tokens == 36 for s in revisits)
    assert all(o.stats.num_external_cached_tokens == 0 for o in outs[:4])
    restored = stats["prefix_cache_restored_hits"]
    assert restored == stats["prefix_cache_external_hits"] == 4 * 36 == 4 * stats["kv_offload_cpu_hits"]
    assert stats["prefix_cache_external_queries"] == 8 * 40  # every admission asked the tier past its GPU hits
    fams = families(ServerMetrics().render((stats, 0.0)).decode())
    assert value(fams, "vllm:prefix_cache_hits") == stats["prefix_cache_hits"] - restored
    assert value(fams, "vllm:external_prefix_cache_hits") == restored
