"""vLLM's per-request histograms: one observation per finished sequence, phases by the core's clock that add up,
token histograms that agree with the counters; summed over API processes in multiprocess mode."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.serve.conftest import MODEL, start_server, wait_idle
from tests.serve.test_metrics import _samples

PHASES = ("queue", "prefill", "decode", "inference")


def _value(text: str, name: str) -> float:
    (sample,) = _samples(text, name)
    return sample[1]


def _count_sum(text: str, name: str) -> tuple[float, float]:
    return _value(text, f"{name}_count"), _value(text, f"{name}_sum")


def test_each_finished_sequence_is_observed_once_and_the_phases_add_up(tiny_engine):
    """A non-streamed prompt with n=2 and a streamed batch of two prompts, 5 tokens each: 4 sequences, each
    observed once in every per-sequence histogram, n once per prompt. The phases (core clock) add up within
    the end-to-end latency (front end), inference is prefill + decode, TPOT decode / 4, the token histograms'
    sums are the counters'."""
    from meshserve.serve.config import ServeConfig

    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL]))
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            body = {"model": MODEL, "max_tokens": 5, "ignore_eos": True, "temperature": 0.8}
            r = http.post("/v1/completions", json={**body, "prompt": [5, 6, 7, 8], "n": 2})
            assert r.status_code == 200 and [c["finish_reason"] for c in r.json()["choices"]] == ["length"] * 2
            with http.stream("POST", "/v1/completions",
                             json={**body, "prompt": [[9, 10, 11], [12, 13]], "stream": True}) as s:
                assert s.status_code == 200
                assert [line for line in s.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
            wait_idle(tiny_engine)
            text = http.get("/metrics").text
    finally:
        srv.stop()
    sequences, tokens = 4, 5
    sums = {}
    for phase in PHASES:
        count, sums[phase] = _count_sum(text, f"vllm:request_{phase}_time_seconds")
        assert count == sequences and sums[phase] >= 0, phase
    assert sums["prefill"] > 0 and sums["decode"] > 0
    assert sums["inference"] == pytest.approx(sums["prefill"] + sums["decode"], abs=1e-9)
    e2e_count, e2e = _count_sum(text, "vllm:e2e_request_latency_seconds")
    assert e2e_count == sequences
    in_core = sums["queue"] + sums["prefill"] + sums["decode"]
    # the rest: the front end's share (parsing, transport, streaming), under 1 s a sequence on a busy 2-core box
    assert e2e - sequences * 1.0 < in_core <= e2e + 1e-3
    _, ttft = _count_sum(text, "vllm:time_to_first_token_seconds")
    assert sums["queue"] + sums["prefill"] <= ttft + 1e-3
    count, tpot = _count_sum(text, "vllm:request_time_per_output_token_seconds")
    assert count == sequences and tpot == pytest.approx(sums["decode"] / (tokens - 1), abs=1e-9)
    count, prompt_tokens = _count_sum(text, "vllm:request_prompt_tokens")
    assert count == sequences and prompt_tokens == _value(text, "vllm:prompt_tokens_total") == 4 + 4 + 3 + 2
    count, generated = _count_sum(text, "vllm:request_generation_tokens")
    assert count == sequences
    assert generated == _value(text, "vllm:generation_tokens_total") == sequences * tokens
    assert _count_sum(text, "vllm:request_params_max_tokens") == (sequences, sequences * 5)
    assert _count_sum(text, "vllm:request_params_n") == (3, 2 + 1 + 1)  # once per prompt
    assert _count_sum(text, "vllm:request_max_num_generation_tokens") == (3, 3 * tokens)
    # the token histograms' buckets end at the server's max_model_len (512), as vLLM's 1-2-5 buckets
    les = [labels for labels, _ in _samples(text, "vllm:request_prompt_tokens_bucket")]
    assert les[-2:] == [f'{{engine="0",le="500.0",model_name="{MODEL}"}}', f'{{engine="0",le="+Inf",model_name="{MODEL}"}}']


def test_prefill_kv_computed_tokens_leave_out_prefix_cache_hits(tiny_engine):
    """vLLM's request_prefill_kv_computed_tokens: per finished sequence, its prompt tokens less those the prefix
    cache served. One 40-token prompt twice: the second finds its first full blocks cached and computes fewer;
    the histogram's sum is the prompt tokens less the cached ones the responses report."""
    from meshserve.serve.config import ServeConfig

    prompt = [(37 * i) % 200 + 40 for i in range(40)]  # unlike other tests' prompts: nothing cached at first
    name = "vllm:request_prefill_kv_computed_tokens"
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL]))
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "ignore_eos": True, "temperature": 0}
            cached, sums = [], []
            for _ in range(2):
                r = http.post("/v1/completions", json=body)
                assert r.status_code == 200
                usage = r.json()["usage"]
                assert usage["prompt_tokens"] == len(prompt)
                cached.append(usage["prompt_tokens_details"]["cached_tokens"])
                wait_idle(tiny_engine)
                sums.append(_count_sum(http.get("/metrics").text, name))
    finally:
        srv.stop()
    assert cached[0] == 0 and 0 < cached[1] < len(prompt)  # its full blocks, not the last token's
    (count_1, first), (count_2, total) = sums
    assert (count_1, count_2) == (1, 2)
    assert first == len(prompt) and total - first == len(prompt) - cached[1] < first
    assert total == 2 * len(prompt) - sum(cached)


def _core_output(rid: str, ids: list[int], finish: str | None = None, queued: float | None = None,
                 scheduled: float | None = None, cached: int = 0):
    from meshserve.engine.messages import EngineCoreOutput

    return EngineCoreOutput(rid, ids, finish, first_times=(queued, scheduled), num_cached_tokens=cached)


def test_phases_come_from_the_core_s_clock_however_late_the_front_end_reads_them(monkeypatch):
    """n=2 through the output processor, the core's times chosen: choice 0 queued at 10.0, scheduled 10.5, tokens
    at steps 10.7, 10.8, 11.0 (length); choice 1 queued 10.1, scheduled 10.6, tokens at 10.8, 10.9 (stop). The
    front end reads all of it folded into one output (a lagging stream) 5 s later: the phases are the core's."""
    from meshserve.engine.input_processor import ProcessedRequest
    from meshserve.engine.messages import EngineCoreOutputs, EngineCoreRequest
    from meshserve.engine.output_coalescing import fold_outputs
    from meshserve.engine.output_processor import OutputProcessor
    from meshserve.sampling import RequestOutputKind, SamplingParams
    from meshserve.serve import metrics as metrics_module
    from meshserve.serve.metrics import ServerMetrics

    clock = [100.0]
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: clock[0])
    metrics = ServerMetrics(max_model_len=64)
    tracker = metrics.track()

    params = SamplingParams(n=2, max_tokens=3, output_kind=RequestOutputKind.DELTA)
    cores = [EngineCoreRequest(f"r-{i}", [1, 2], params, max_tokens=3) for i in range(2)]
    processor = OutputProcessor(None)
    processor.add_request(ProcessedRequest("r", None, [1, 2], params, 0.0, cores))
    steps = [
        (10.7, [_core_output("r-0", [5], queued=10.0, scheduled=10.5, cached=1)]),
        (10.8, [_core_output("r-0", [6]), _core_output("r-1", [7], queued=10.1, scheduled=10.6)]),
        (10.9, [_core_output("r-1", [8], "stop")]),
        (11.0, [_core_output("r-0", [9], "length")]),
    ]
    folded = None
    for t, outs in steps:
        for out in processor.process_outputs(EngineCoreOutputs(outs, timestamp=t)).request_outputs:
            folded = out if folded is None else fold_outputs(folded, out, RequestOutputKind.DELTA)
    clock[0] += 5.0
    tracker.observe(0, folded)
    tracker.finish("length")
    text = metrics.render(None).decode()
    expected = {"queue": 0.5 + 0.5, "prefill": 0.2 + 0.2, "decode": 0.3 + 0.1, "inference": 0.5 + 0.3}
    for phase, total in expected.items():
        assert _count_sum(text, f"vllm:request_{phase}_time_seconds") == (2, pytest.approx(total)), phase
    assert _count_sum(text, "vllm:request_time_per_output_token_seconds") == (2, pytest.approx(0.3 / 2 + 0.1))
    assert _count_sum(text, "vllm:request_generation_tokens") == (2, 3 + 2)
    assert _count_sum(text, "vllm:request_prompt_tokens") == (2, 2 + 2)
    assert _count_sum(text, "vllm:request_params_max_tokens") == (2, 3 + 3)
    # each choice its own cached count (the core's, with its first token): 1 of choice 0's 2, none of choice 1's
    assert _count_sum(text, "vllm:request_prefill_kv_computed_tokens") == (2, (2 - 1) + (2 - 0))
    assert _count_sum(text, "vllm:request_params_n") == (1, 2)
    assert _count_sum(text, "vllm:request_max_num_generation_tokens") == (1, 3)  # the longer choice's


def test_aborted_sequences_are_not_observed():
    """As vLLM's client aborts: a sequence cut off (the client gone) has no per-request observation, nor does
    its prompt's n; its finished sibling has its own."""
    from meshserve.outputs import CompletionOutput, RequestOutput, SequenceStats
    from meshserve.serve.metrics import ServerMetrics

    metrics = ServerMetrics()
    tracker = metrics.track()
    stats = SequenceStats(4, n=2, queued_time=1.0, first_scheduled_time=1.1, first_token_time=1.2,
                          last_token_time=1.4)
    tracker.observe(0, RequestOutput("r", None, [1, 2, 3], [
        CompletionOutput(0, "", [7, 7, 7], finish_reason="stop", stats=stats),
        CompletionOutput(1, "", [7])], finished=False))
    tracker.fail(asyncio.CancelledError())
    text = metrics.render(None).decode()
    assert _count_sum(text, "vllm:request_queue_time_seconds") == (1, pytest.approx(0.1))
    assert _count_sum(text, "vllm:request_time_per_output_token_seconds") == (1, pytest.approx(0.1))
    assert _count_sum(text, "vllm:request_generation_tokens") == (1, 3)
    assert _count_sum(text, "vllm:request_params_n") == (0, 0)
    assert _count_sum(text, "vllm:request_max_num_generation_tokens") == (0, 0)


# One API process of several: one finished sequence observed, then (`render`) what a scrape it answers returns.
_API_PROCESS = """
import sys
from meshserve.outputs import CompletionOutput, RequestOutput, SequenceStats
from meshserve.serve.metrics import ServerMetrics

decode, render = float(sys.argv[1]), sys.argv[2] == "render"
metrics = ServerMetrics(max_model_len=512)
tracker = metrics.track()
stats = SequenceStats(8, queued_time=1.0, first_scheduled_time=1.0, first_token_time=2.0, last_token_time=2.0 + decode)
tracker.observe(0, RequestOutput("r", None, [1] * 5, [CompletionOutput(0, "", [7] * 3, finish_reason="length",
                                                                       stats=stats)], finished=True))
tracker.finish("length")
if render:
    sys.stdout.write(metrics.render(None).decode())
"""


def test_api_processes_histograms_are_summed(tmp_path):
    """--api-server-count N: each process writes its observations to the shared directory; a scrape answered by
    either returns both processes' together."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": os.getcwd()}
    outs = []
    for decode, render in ((0.2, "-"), (0.4, "render")):
        done = subprocess.run([sys.executable, "-c", _API_PROCESS, str(decode), render], check=False, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        outs.append(done.stdout)
    text = outs[-1]
    assert _count_sum(text, "vllm:request_decode_time_seconds") == (2, pytest.approx(0.6))
    assert _count_sum(text, "vllm:request_time_per_output_token_seconds") == (2, pytest.approx(0.3))
    assert _count_sum(text, "vllm:request_prompt_tokens") == (2, 10)
    assert _count_sum(text, "vllm:request_params_n") == (2, 2)
    assert json.dumps(text).count("vllm:request_queue_time_seconds_count") == 1  # merged, not per process
