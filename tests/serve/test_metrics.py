"""ServerMetrics: the admission margin's series with several API processes (prometheus_client's multiprocess
files), one series per process, written by each process's own controller."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

# One API process: its own margin, driven with `late` x target errors until it updated `updates` times, then
# (`render`) the exposition text a scrape answered by this process returns.
_API_PROCESS = """
import sys
from meshserve.engine.admission_margin import AdmissionMargin, MarginRule
from meshserve.serve.metrics import ServerMetrics

late, updates, render = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "render"
margin = AdmissionMargin(MarginRule(min_samples=16, update_every=16))
metrics = ServerMetrics()
metrics.watch_admission_margin(margin)
while margin.num_updates < updates:
    margin.observe(0.7, 0.7 + late, 1.0)
if render:
    sys.stdout.write(metrics.render(None).decode())
"""


ENGINE_0 = '{engine="0",model_name="meshserve"}'  # vLLM's labels of a server's one engine, by default


def _api_process(metrics_dir, late: float, updates: int, render: bool) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", _API_PROCESS, str(late), str(updates), "render" if render else "-"],
                          check=False, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of each sample of exactly this series name."""
    out = []
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name:
            out.append((series[len(name):], float(value)))
    return out


def test_each_api_process_exports_its_own_margin_and_the_updates_are_summed(tmp_path):
    _api_process(tmp_path, late=0.0, updates=2, render=False)  # accurate predictions: opens 0.8 -> 0.9
    text = _api_process(tmp_path, late=0.3, updates=1, render=True)  # late: closes 0.8 -> 0.75
    margins = sorted(v for _, v in _samples(text, "meshserve:admission_margin"))
    assert margins == pytest.approx([0.75, 0.9])
    assert all('pid="' in labels for labels, _ in _samples(text, "meshserve:admission_margin"))
    errors = sorted(v for _, v in _samples(text, "meshserve:admission_margin_ttft_error"))
    assert errors == pytest.approx([0.0, 0.3])
    assert _samples(text, "meshserve:admission_margin_updates_total") == [("", 3.0)]


# -- inter-token latency ---------------------------------------------------------------------------
def _output(prompt_tokens: int, choices: dict[int, int], step_times: list[float] | None = None,
            finish: dict[int, str] | None = None):
    """One DELTA output: choice index -> its new tokens (and the core's step times, its finish reason)."""
    from meshserve.outputs import CompletionOutput, RequestOutput

    finish = finish or {}
    return RequestOutput("r", None, [1] * prompt_tokens,
                         [CompletionOutput(i, "", [7] * n, finish_reason=finish.get(i), step_times=step_times)
                          for i, n in choices.items()], finished=False)


def _itl_observations(metrics) -> tuple[float, float]:
    text = metrics.render(None).decode()
    count = _samples(text, "vllm:inter_token_latency_seconds_count")[0][1]
    total = _samples(text, "vllm:inter_token_latency_seconds_sum")[0][1]
    return count, total


@pytest.mark.parametrize("n,prompts", [(1, 1), (4, 1), (1, 2)])
def test_inter_token_latency_is_each_sequence_s_own_gap(monkeypatch, n, prompts):
    """Steps 0.1 s apart, each giving every sequence (n choices of each prompt) one token: every inter-token
    observation is 0.1 s, as vLLM measures it per sequence. (The choices' and prompts' tokens of one step were
    spread over the gap as if they came one after another: n=4 reported 0.025 s.)"""
    from meshserve.serve import metrics as metrics_module
    from meshserve.serve.metrics import ServerMetrics

    clock = [100.0]
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: clock[0])
    metrics = ServerMetrics()
    tracker = metrics.track()
    steps = 5
    for _ in range(steps):
        clock[0] += 0.1
        for p in range(prompts):
            tracker.observe(p, _output(3, dict.fromkeys(range(n), 1)))
    tracker.finish("length")
    sequences = n * prompts
    count, total = _itl_observations(metrics)
    assert count == sequences * (steps - 1)  # every token after its sequence's first
    assert total / count == pytest.approx(0.1)
    text = metrics.render(None).decode()
    assert _samples(text, "vllm:generation_tokens_total") == [(ENGINE_0, sequences * steps)]
    # per sequence, as vLLM's requests (n choices run as n requests there): TTFT, prompt tokens, e2e
    assert _samples(text, "vllm:prompt_tokens_total") == [(ENGINE_0, 3 * sequences)]
    assert _samples(text, "vllm:time_to_first_token_seconds_count") == [(ENGINE_0, sequences)]


def test_a_lagging_stream_s_folded_tokens_share_their_gap(monkeypatch):
    """One output carrying 3 tokens of one sequence 0.3 s after its last: 3 observations of 0.1 s."""
    from meshserve.serve import metrics as metrics_module
    from meshserve.serve.metrics import ServerMetrics

    clock = [100.0]
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: clock[0])
    metrics = ServerMetrics()
    tracker = metrics.track()
    tracker.observe(0, _output(3, {0: 1}))
    clock[0] += 0.3
    tracker.observe(0, _output(3, {0: 3}))
    count, total = _itl_observations(metrics)
    assert count == 3 and total == pytest.approx(0.3)


def test_inter_token_latency_is_timed_between_the_core_s_steps(monkeypatch):
    """With the core's step times, one observation per step after the first, whatever reached the front end
    when: 2 tokens of one step (accepted proposals) are one 0.1 s gap, as vLLM counts them; steps folded into
    one output (a lagging stream: 3 steps 0.1 s apart, read at once) keep their own gaps, and the first
    output's folded steps are no zero gaps. (Spreading front-end gaps over tokens reported 0 s, then 0.05 s.)"""
    from meshserve.serve import metrics as metrics_module
    from meshserve.serve.metrics import ServerMetrics

    clock = [100.0]
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: clock[0])
    metrics = ServerMetrics()
    tracker = metrics.track()
    clock[0] += 0.5  # the stream lagged: three steps arrive at once
    tracker.observe(0, _output(3, {0: 3}, step_times=[10.0, 10.1, 10.2]))
    count, total = _itl_observations(metrics)
    assert count == 2 and total == pytest.approx(0.2)
    clock[0] += 0.001
    tracker.observe(0, _output(3, {0: 2}, step_times=[10.3]))  # one step, a proposal accepted beside its token
    count, total = _itl_observations(metrics)
    assert count == 3 and total == pytest.approx(0.3)


def test_e2e_latency_per_sequence_that_ended_by_stop_or_length(monkeypatch):
    """n=2: each choice's e2e from the request's arrival when it finished; an aborted request's do not count."""
    from meshserve.serve import metrics as metrics_module
    from meshserve.serve.metrics import ServerMetrics

    clock = [100.0]
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: clock[0])
    metrics = ServerMetrics()
    tracker = metrics.track()
    clock[0] += 0.2
    tracker.observe(0, _output(3, {0: 1, 1: 1}, finish={0: "stop"}))
    clock[0] += 0.3
    tracker.observe(0, _output(3, {1: 1}, finish={1: "length"}))
    tracker.finish("length")
    aborted = metrics.track()
    aborted.observe(0, _output(3, {0: 1}))
    aborted.fail(asyncio.CancelledError())
    text = metrics.render(None).decode()
    assert _samples(text, "vllm:e2e_request_latency_seconds_count") == [(ENGINE_0, 2.0)]
    assert _samples(text, "vllm:e2e_request_latency_seconds_sum")[0][1] == pytest.approx(0.2 + 0.5)
    outcomes = {labels: v for labels, v in _samples(text, "meshserve:requests_total") if v}
    assert outcomes == {'{outcome="length"}': 1.0, '{outcome="abort"}': 1.0}  # the outcome: per HTTP request
