"""`meshserve bench serve` against a live tiny server: workloads, metrics, JSON, plot, BENCHMARKS.md row."""

from __future__ import annotations

import json
import math
import random

from meshserve.bench.serve_bench import (
    RequestResult,
    append_benchmarks_md,
    summarize,
    w3_requests,
    write_plot,
)
from meshserve.cli import main


def test_w3_workload_is_drawn_as_specified():
    reqs = w3_requests(8.0)
    random.seed(3)
    n = max(200, 30 * 8)
    prompts = [[random.randint(3, 10000) for _ in range(512)] for _ in range(n)]
    gaps = [random.expovariate(8.0) for _ in range(n)]
    assert len(reqs) == 240 and [r.prompt for r in reqs] == prompts
    assert math.isclose(reqs[-1].send_at, sum(gaps)) and all(r.max_tokens == 128 for r in reqs)


def test_summary_percentiles_and_goodput():
    results = [RequestResult(ok=True, ttft=0.1 * (i + 1), itls=[0.01] * 9, e2e=0.1 * (i + 1) + 0.09,
                             output_tokens=10, prompt_tokens=5) for i in range(10)]
    results.append(RequestResult(ok=False, error="HTTP 429"))
    s = summarize(results, duration=2.0, load=4.0, ttft_slo=0.5, tpot_slo=0.05)
    assert s["completed"] == 10 and s["failed"] == 1 and s["first_error"] == "HTTP 429"
    assert s["goodput"] == 5 / 2.0  # ttft 0.1..0.5 meet the SLO
    assert math.isclose(s["ttft_p50"], 0.55) and math.isclose(s["itl_p99"], 0.01)
    assert math.isclose(s["tpot_mean"], 0.01) and s["output_tok_s"] == 50.0


def test_benchmarks_row_and_plot(tmp_path):
    points = [summarize([RequestResult(ok=True, ttft=0.2, itls=[0.02], e2e=0.22, output_tokens=2)], 1.0, q)
              for q in (4.0, 8.0)]
    md = tmp_path / "BENCHMARKS.md"
    append_benchmarks_md(str(md), points, "H100 80GB", "meshserve bench serve --qps 4,8", baseline="vLLM 31.0")
    text = md.read_text()
    assert text.startswith("# Benchmarks") and "| H100 80GB |" in text and "W3 goodput 1.0 req/s" in text
    append_benchmarks_md(str(md), points, "H100 80GB", "again")
    assert md.read_text().count("| H100 80GB |") == 2 and md.read_text().count("# Benchmarks") == 1
    svg = write_plot(str(tmp_path / "lat.svg"), points)
    with open(svg) as f:
        text = f.read()
    assert text.startswith("<svg") and "ttft_p99" in text


def test_bench_serve_cli_against_live_server(live, tmp_path, capsys):
    out = tmp_path / "w3.json"
    rc = main(["bench", "serve", "--base-url", live.base_url, "--qps", "40,inf", "--num-prompts", "12",
               "--input-len", "16", "--output-len", "6", "--max-token-id", "300", "--no-progress",
               "--output-json", str(out), "--plot", str(tmp_path / "plot.svg")])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and [p["qps"] for p in report["points"]] == [40.0, "inf"]
    for p in report["points"]:
        assert p["completed"] == 12 and p["failed"] == 0 and p["output_tokens"] == 12 * 6
        assert p["prompt_tokens"] == 12 * 16 and p["ttft_p50"] > 0 and p["itl_p50"] > 0
    # each point's wall-clock bounds (to cut per-second logs by point), in order and not overlapping
    first, second = report["points"]
    assert first["wall_start"] < first["wall_end"] <= second["wall_start"] < second["wall_end"]
    assert (tmp_path / "plot.svg").exists()
    assert "QPS 40: 12/12 ok" in capsys.readouterr().out


def test_bench_serve_concurrency_chat_from_file(live, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nWhat is the capital of France?\n")
    out = tmp_path / "c.json"
    rc = main(["bench", "serve", "--base-url", live.base_url, "--endpoint", "chat", "--dataset", "file",
               "--dataset-path", str(prompts), "--concurrency", "3", "--num-prompts", "6", "--output-len", "4",
               "--no-progress", "--output-json", str(out)])
    assert rc == 0
    point = json.loads(out.read_text())["points"][0]
    assert point["concurrency"] == 3 and point["completed"] == 6 and point["output_tokens"] == 24


def test_bench_serve_structured_mode_constrains_scores_and_times_the_first_request(live, tmp_path, capsys):
    from meshserve.bench.serve_structured import data_path

    def run(name: str, *flags: str) -> dict:
        out = tmp_path / f"{name}.json"
        rc = main(["bench", "serve", "--base-url", live.base_url, "--endpoint", "chat", "--no-ignore-eos",
                   "--prompts-file", data_path("person_prompts.jsonl"), "--no-progress", "--label", name,
                   "--output-json", str(out), *flags])
        assert rc == 0
        return json.loads(out.read_text())

    schema = data_path("person_schema.json")
    on = run("on", "--concurrency", "1,4", "--num-prompts", "1,4", "--output-len", "160",
             "--response-format-json-schema", schema)
    assert on["response_format"] is True and on["engine"] == "on" and on["schema"]["required"]
    assert on["first_request"]["ok"] and on["first_request"]["ttft_s"] > 0
    assert [(p["concurrency"], p["completed"]) for p in on["points"]] == [(1, 1), (4, 4)]
    for p in on["points"]:  # the random model's answers are the grammar's: every one parses and validates
        assert p["finish_reasons"] == {"stop": p["completed"]}, p
        assert p["json_ok"] == 1.0 and p["schema_ok"] == 1.0, p["sample_answers"]
        assert p["output_tokens_per_request"] == p["output_tokens"] / p["completed"] > 5
    # cut at max_tokens mid-object: every request still ends (200, finish "length"), none parses
    cut = run("cut", "--concurrency", "4", "--num-prompts", "4", "--output-len", "3",
              "--response-format-json-schema", schema)["points"][0]
    assert cut["completed"] == 4 and cut["finish_reasons"] == {"length": 4} and cut["json_ok"] == 0.0
    assert cut["output_tokens"] == 12
    # the baseline: same prompts, nothing sent, answers scored; the table lines the two runs up
    off = run("on", "--concurrency", "1,4", "--num-prompts", "1,4", "--output-len", "40",
              "--score-json-schema", schema)
    assert off["response_format"] is False and off["first_request"]["ok"]
    assert all(p["schema_ok"] == 0.0 and set(p["finish_reasons"]) <= {"length", "stop"} for p in off["points"])
    assert "first request alone: TTFT" in capsys.readouterr().out
    from meshserve.bench.serve_structured import overhead_rows

    rows = overhead_rows([off, on])
    assert [r["concurrency"] for r in rows] == [1, 4]
    assert all(r["free_output_tok_s"] > 0 and r["tpot_overhead"] is not None for r in rows)
