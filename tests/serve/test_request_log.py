"""`serve --request-log FILE`: a line per served prompt that `meshserve simulate --trace` replays as it was."""

from __future__ import annotations

import json

from meshserve.outputs import CompletionOutput, RequestOutput
from meshserve.serve.metrics import ServerMetrics
from meshserve.serve.request_log import RequestLog
from meshserve.simulator.trace import file_trace


def _serve(metrics: ServerMetrics, prompts: list[int], outputs: list[list[int]], outcome: str = "stop") -> None:
    """One HTTP request through a tracker: prompt i of `prompts` tokens, its choices' token counts."""
    tracker = metrics.track()
    for i, (prompt_len, choices) in enumerate(zip(prompts, outputs)):
        for step in range(max(choices)):
            outs = [CompletionOutput(c, "", [7]) for c, n in enumerate(choices) if step < n]
            tracker.observe(i, RequestOutput(f"r{i}", None, [1] * prompt_len, outs, finished=False))
    tracker.finish(outcome)


def test_served_prompts_are_logged_and_replay_as_a_trace(tmp_path):
    path = tmp_path / "requests.jsonl"
    log = RequestLog(path)
    metrics = ServerMetrics(log)
    _serve(metrics, [120], [[30]])
    _serve(metrics, [50, 60], [[5, 9], [4]], outcome="length")  # two prompts, the first with n = 2
    _serve(metrics, [70], [[3]], outcome="abort")  # never logged: its lengths were not decided
    log.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["prompt_tokens"], r["output_tokens"], r["outcome"]) for r in rows] == [
        (120, 30, "stop"), (50, 9, "length"), (60, 4, "length")]
    assert all(r["ttft_s"] >= 0 and r["e2e_s"] >= r["ttft_s"] for r in rows)
    assert rows[0]["timestamp"] <= rows[1]["timestamp"] == rows[2]["timestamp"]
    trace = file_trace(path)
    assert list(trace.prompt_len) == [120, 50, 60] and list(trace.output_len) == [30, 9, 4]
    assert trace.arrival_s[0] == 0.0


def test_no_log_by_default():
    metrics = ServerMetrics()
    _serve(metrics, [10], [[2]])
    assert metrics.request_log is None
