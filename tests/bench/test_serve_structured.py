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
    matched_output_len,
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
    assert one["matched"] is False  # 128 free tokens against 50: not like for like
    assert rows["meshserve", 64]["tok_s_overhead"] == 0.0 and math.isclose(rows["meshserve", 64]["tpot_overhead"], 0.05)
    assert "tok_s_overhead" not in rows["vllm", 1]
    table = format_table(reports).splitlines()
    assert len(table) == 5
    assert table[2].startswith("| meshserve | m | 1 | longer | 200 / 190 (+5.0%) | 5.00 / 5.20 (+4.0%) | - / - (-) | "
                               "128.0 / 50.0 |"), table[2]
    assert table[4].startswith("| vllm | m | 1 | - | - / 180 (-) |")


def test_the_free_run_of_matching_length_is_the_baseline_first():
    """A schema point against two free runs: the one whose answers are as long comes first, marked matched,
    with the ITL p50 overhead; the longer one follows for context."""
    long_free = _report("meshserve", False, [(64, 10000.0, 0.0053)], 0.08)
    short_free = _report("meshserve", False, [(64, 7000.0, 0.0060)], 0.08)
    short_free["points"][0]["output_tokens_per_request"] = 47.0
    schema = _report("meshserve", True, [(64, 6800.0, 0.0063)], 0.5)
    schema["points"][0]["output_tokens_per_request"] = 47.2
    for rep, itl in ((long_free, 0.0053), (short_free, 0.0056), (schema, 0.0058)):
        rep["points"][0]["itl_p50"] = itl
    rows = overhead_rows([long_free, schema, short_free])
    assert [r["matched"] for r in rows] == [True, False]
    assert rows[0]["free_output_tok_s"] == 7000.0 and math.isclose(rows[0]["tpot_overhead"], 0.05)
    assert math.isclose(rows[0]["itl_overhead"], 0.058 / 0.056 - 1)
    assert math.isclose(rows[1]["tpot_overhead"], 0.0063 / 0.0053 - 1)
    table = format_table([long_free, schema, short_free]).splitlines()
    assert ("| same length | 7,000 / 6,800 (+2.9%) | 6.00 / 6.30 (+5.0%) | 5.60 / 5.80 (+3.6%) | 47.0 / 47.2 |"
            in table[2])
    assert "| longer |" in table[3]
    assert matched_output_len([long_free, schema]) == 47
    with pytest.raises(ValueError, match="no schema run"):
        matched_output_len([long_free])
