"""Structured requests for `meshserve bench serve`: what a JSON schema costs a server (ours or vLLM's).

`--response-format-json-schema FILE` sends OpenAI's `response_format` {"type": "json_schema", ...} with every
request (chat or completions, as OpenAI and vLLM accept it); `--score-json-schema FILE` sends nothing but
scores the answers against the schema (the unconstrained baseline, same prompts). Either way one request is
sent alone before the load points and its TTFT reported apart (with the constraint it includes the grammar's
first compile), and each point reports the answers that parse as JSON and validate, the output tokens
actually generated per request and the finish reasons. Run once with and once without the schema against a
server: `table` lines them up (tok/s, time per output token and ITL, and the overhead of the constraint).
The fair baseline is a free run whose answers are as long as the constrained ones (`matched-len` prints its
max_tokens): with answers of different lengths the two runs prefill at different rates.

The shipped workload: data/person_schema.json (the schema of `meshserve bench structured`) and
data/person_prompts.jsonl (its twenty extraction prompts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from meshserve.bench.serve_bench import BenchRequest, RequestResult, run_load
from meshserve.errors import InvalidArgumentError


def data_path(name: str) -> str:
    """Path of a file shipped in meshserve/bench/data/ ("person_schema.json", "person_prompts.jsonl")."""
    return str(resources.files("meshserve.bench").joinpath("data", name))


def load_schema(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            schema = json.load(f)
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"JSON schema {path}: {str(e).splitlines()[0]}", param="json_schema") from None
    if not isinstance(schema, dict):
        raise InvalidArgumentError(f"JSON schema {path}: must be a JSON object", param="json_schema")
    return schema


def response_format(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    """The request field, as OpenAI's SDK and vLLM spell it."""
    return {"response_format": {"type": "json_schema",
                                "json_schema": {"name": name, "schema": schema, "strict": True}}}


def json_scores(texts: list[str], schema: dict[str, Any] | None) -> dict[str, Any]:
    """Fractions of answers that parse as JSON and that validate against `schema` (None without the
    jsonschema package or a schema). Raw control characters inside strings are let through (xgrammar 0.2
    admits them in a string bounded by maxLength, and a random model picks them); json_strict_ok counts the
    answers that parse without them too."""
    if not texts:
        return {"json_ok": None, "json_strict_ok": None, "schema_ok": None}
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    parsed = strict = valid = 0
    for text in texts:
        try:
            obj = json.loads(text, strict=False)
        except json.JSONDecodeError:
            continue
        parsed += 1
        try:
            json.loads(text)
            strict += 1
        except json.JSONDecodeError:
            pass
        if jsonschema is not None and schema is not None:
            try:
                jsonschema.validate(obj, schema)
                valid += 1
            except jsonschema.ValidationError:
                pass
    checked = jsonschema is not None and schema is not None
    return {"json_ok": round(parsed / len(texts), 4), "json_strict_ok": round(strict / len(texts), 4),
            "schema_ok": round(valid / len(texts), 4) if checked else None}


def structured_stats(results: list[RequestResult], schema: dict[str, Any] | None) -> dict[str, Any]:
    """Per load point: output tokens per request, finish reasons, and the answers' JSON scores."""
    ok = [r for r in results if r.ok]
    return {"output_tokens_per_request": sum(r.output_tokens for r in ok) / len(ok) if ok else 0.0,
            "finish_reasons": dict(Counter(str(r.finish_reason) for r in ok)),
            **json_scores([r.text.strip() for r in ok], schema), "sample_answers": [r.text for r in ok[:2]]}


def first_request(base_url: str, model: str, req: BenchRequest, **load_kwargs: Any) -> dict[str, Any]:
    """Send one request alone and time it: with a constraint new to the server, its TTFT holds the compile."""
    (res,), _ = asyncio.run(run_load(base_url, model, [BenchRequest(req.prompt, req.max_tokens)],
                                     **{**load_kwargs, "concurrency": None, "progress": False}))
    print(f"first request alone: TTFT {res.ttft or math.nan:.3f} s, {res.output_tokens} tokens"
          + (f", error {res.error}" if res.error else ""), flush=True)
    return {"ok": res.ok, "ttft_s": res.ttft, "e2e_s": res.e2e, "output_tokens": res.output_tokens,
            "finish_reason": res.finish_reason, "error": res.error}


def format_point(s: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    return (f"  {s['output_tokens_per_request']:.1f} output tokens per request, finish {s['finish_reasons']}; "
            f"JSON {pct(s['json_ok'])}, schema {pct(s['schema_ok'])}, TPOT p50 {s['tpot_p50'] * 1e3:.2f} ms")


# -- the table of runs with and without the schema ---------------------------------------------------
# a free run is the like-for-like baseline of a schema run when its answers are this close in length: a
# schema's answer ends with its object (47 tokens for the person schema), a free one on a random-weight model
# runs to max_tokens, and at a fixed concurrency shorter answers mean more prefills per decoded token
MATCHED_LENGTH = 0.1


def matched_output_len(reports: list[dict[str, Any]]) -> int:
    """max_tokens for the free run that matches the schema runs' answers: their mean tokens per request."""
    lengths = [p["output_tokens_per_request"] for rep in reports if rep.get("response_format")
               for p in rep["points"] if p.get("output_tokens_per_request")]
    if not lengths:
        raise ValueError("no schema run with answers among the reports")
    return max(1, round(sum(lengths) / len(lengths)))


def _rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rep in reports:
        constrained = bool(rep.get("response_format"))
        for p in rep["points"]:
            rows.append({"engine": rep.get("engine") or rep.get("base_url"), "model": rep["model"],
                         "concurrency": p.get("concurrency", p.get("qps")), "schema": constrained,
                         "output_tok_s": p["output_tok_s"], "tpot_p50_ms": p["tpot_p50"] * 1e3,
                         "tpot_mean_ms": p["tpot_mean"] * 1e3, "ttft_p50_ms": p["ttft_p50"] * 1e3,
                         "itl_p50_ms": p["itl_p50"] * 1e3 if p.get("itl_p50") is not None else None,
                         "tokens_per_request": p.get("output_tokens_per_request"),
                         "json_ok": p.get("json_ok"), "schema_ok": p.get("schema_ok"),
                         "first_ttft_ms": (rep.get("first_request") or {}).get("ttft_s", math.nan) * 1e3,
                         "failed": p["failed"]})
    return rows


def _same_length(a: float | None, b: float | None) -> bool:
    return bool(a and b) and abs(a - b) <= MATCHED_LENGTH * b


def overhead_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per schema point and free baseline (same engine, model and concurrency; a schema point without
    one gets a row without overheads), the baseline of matching answer length first: `matched` says whether
    the free answers are within MATCHED_LENGTH of the schema's in length (only then is the overhead the
    constraint's alone). Overheads are positive when the schema costs: tok/s lost, TPOT and ITL gained."""
    rows = _rows(reports)
    out = []
    for r in rows:
        if not r["schema"]:
            continue
        bases = [b for b in rows if not b["schema"] and b["engine"] == r["engine"] and b["model"] == r["model"]
                 and b["concurrency"] == r["concurrency"]]
        bases.sort(key=lambda b: abs((b["tokens_per_request"] or 0) - (r["tokens_per_request"] or 0)))
        if not bases:
            out.append({**r})
        for base in bases:
            row = {**r, "matched": _same_length(base["tokens_per_request"], r["tokens_per_request"])}
            for key in ("output_tok_s", "tpot_p50_ms", "itl_p50_ms", "first_ttft_ms", "ttft_p50_ms",
                        "tokens_per_request"):
                row[f"free_{key}"] = base[key]
            row["tok_s_overhead"] = 1 - r["output_tok_s"] / base["output_tok_s"] if base["output_tok_s"] else None
            row["tpot_overhead"] = r["tpot_p50_ms"] / base["tpot_p50_ms"] - 1 if base["tpot_p50_ms"] else None
            row["itl_overhead"] = (r["itl_p50_ms"] / base["itl_p50_ms"] - 1
                                   if r["itl_p50_ms"] and base["itl_p50_ms"] else None)
            out.append(row)
    return out


def format_table(reports: list[dict[str, Any]]) -> str:
    """A markdown table of every schema run beside each free run ("free / schema", the overhead in brackets).
    Read the overhead of the constraint off the rows whose baseline is "same length": there both runs have as
    many prefills per decoded token, so TPOT and ITL p50 differ by the per-step grammar work only; against a
    longer free run tok/s and TPOT also count the extra prefills of the shorter constrained answers."""
    def f(v: Any, spec: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    header = ("| engine | model | concurrency | baseline | output tok/s | TPOT p50 ms | ITL p50 ms "
              "| tokens per request | TTFT p50 ms | first request TTFT ms | schema valid |")
    lines = [header, "|" + "---|" * 11]

    def pair(r: dict[str, Any], key: str, spec: str, overhead: str | None = None) -> str:
        text = f"{f(r.get('free_' + key), spec)} / {f(r[key], spec)}"
        return text + (f" ({f(r.get(overhead), '+.1%')})" if overhead else "")

    for r in overhead_rows(reports):
        base = "-" if "matched" not in r else "same length" if r["matched"] else "longer"
        cells = [r["engine"], r["model"], r["concurrency"], base, pair(r, "output_tok_s", ",.0f", "tok_s_overhead"),
                 pair(r, "tpot_p50_ms", ".2f", "tpot_overhead"), pair(r, "itl_p50_ms", ".2f", "itl_overhead"),
                 pair(r, "tokens_per_request", ".1f"), pair(r, "ttft_p50_ms", ".1f"),
                 pair(r, "first_ttft_ms", ".1f"), f(r["schema_ok"], ".0%")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m meshserve.bench.serve_structured table A.json B.json ...`: print the table of bench serve
    reports (runs with and without --response-format-json-schema); --output-json writes its rows."""
    p = argparse.ArgumentParser(prog="python -m meshserve.bench.serve_structured")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="line up bench serve reports with and without the schema")
    t.add_argument("reports", nargs="+")
    t.add_argument("--output-json", default=None)
    m = sub.add_parser("matched-len", help="max_tokens of the free run whose answers match the schema runs' length")
    m.add_argument("reports", nargs="+")
    ns = p.parse_args(argv)
    reports = [json.loads(Path(r).read_text()) for r in ns.reports]
    if ns.cmd == "matched-len":
        print(matched_output_len(reports))
        return 0
    print(format_table(reports))
    if ns.output_json:
        Path(ns.output_json).write_text(json.dumps(overhead_rows(reports), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
