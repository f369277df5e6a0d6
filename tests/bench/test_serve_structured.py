"""Structured requests in `meshserve bench serve`: the shipped workload is `bench structured`'s, answers are
scored as JSON and against the schema, and runs with and without the schema line up into overheads."""

from __future__ import annotations

import json
import math

import pytest

from meshserve.bench.serve_bench import RequestResult
from meshserve.bench.serve_structured import (
    data_path,
    format_table,
    json_scores,
    load_schema,
    overhead_rows,
    response_format,
    structured_stats,
)
from meshserve.bench.structured_outputs import SCHEMA, prompts


def test_shipped_schema_and_prompts_are_bench_structureds():
    assert load_schema(data_path("person_schema.json")) == SCHEMA
    with open(data_path("person_prompts.jsonl")) as f:
        assert [json.loads(line)["prompt"] for line in f] == prompts()
    body = response_format(SCHEMA, "person")["response_format"]
    assert body == {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


def test_json_scores():
    good = '{"name": "Ann", "age": 30, "city": "Oslo", "role": "doctor"}'
    control = '{"name": "A\x12n", "age": 30, "city": "Oslo", "role": "doctor"}'  # a raw control character
    extra_key = '{"name": "Ann", "age": 30, "city": "Oslo", "role": "doctor", "x": 1}'
    too_old = '{"name": "Ann", "age": 131, "city": "Oslo", "role": "doctor"}'
    cut = '{"name": "Ann", "age": 3'
    scores = json_scores([good, control, extra_key, too_old, cut], SCHEMA)
    assert scores == {"json_ok": 0.8, "json_strict_ok": 0.6, "schema_ok": 0.4}
    assert json_scores([], SCHEMA) == {"json_ok": None, "json_strict_ok": None, "schema_ok": None}
    assert json_scores([good], None)["schema_ok"] is None


def test_structured_stats_count_only_finished_requests():
    results = [RequestResult(ok=True, output_tokens=40, text=' {"a": 1} ', finish_reason="stop"),
               RequestResult(ok=True, output_tokens=128, text="{", finish_reason="length"),
               RequestResult(ok=False, error="HTTP 500")]
    stats = structured_stats(results, {"type": "object"})
    assert stats["output_tokens_per_request"] == 84.0
    assert stats["finish_reasons"] == {"stop": 1, "length": 1}
    assert stats["json_ok"] == 0.5 and stats["schema_ok"] == 0.5


def _report(engine: str, constrained: bool, points: list[tuple[int, float, float]], first: float) -> dict:
    return {"engine": engine, "model": "m", "response_format": constrained, "first_request": {"ttft_s": first},
            "points": [{"concurrency": c, "output_tok_s": tok_s, "tpot_p50": tpot, "tpot_mean": tpot,
                        "ttft_p50": 0.02, "output_tokens_per_request": 50.0 if constrained else 128.0,
                        "schema_ok": 1.0 if constrained else 0.0, "failed": 0} for c, tok_s, tpot in points]}


def test_overheads_pair_each_schema_point_with_the_free_one():
    reports = [_report("meshserve", False, [(1, 200.0, 0.0050), (64, 8000.0, 0.0080)], 0.030),
               _report("meshserve", True, [(1, 190.0, 0.0052), (64, 8000.0, 0.0084)], 0.250),
               _report("vllm", True, [(1, 180.0, 0.0055)], 0.300)]  # no free run: no overhead
    rows = {(r["engine"], r["concurrency"]): r for r in overhead_rows(reports)}
    assert set(rows) == {("meshserve", 1), ("meshserve", 64), ("vllm", 1)}
    one = rows["meshserve", 1]
    assert math.isclose(one["tok_s_overhead"], 0.05) and math.isclose(one["tpot_overhead"], 0.04)
    assert one["free_first_ttft_ms"] == pytest.approx(30.0) and one["first_ttft_ms"] == pytest.approx(250.0)
    assert rows["meshserve", 64]["tok_s_overhead"] == 0.0 and math.isclose(rows["meshserve", 64]["tpot_overhead"], 0.05)
    assert "tok_s_overhead" not in rows["vllm", 1]
    table = format_table(reports).splitlines()
    assert len(table) == 5 and "| meshserve | m | 1 | 200 / 190 (+5.0%) | 5.00 / 5.20 (+4.0%) | 128.0 / 50.0 |" in table[2]
    assert table[4].startswith("| vllm | m | 1 | - / 180 (-) |")
