"""Benchmark results: a table on stdout, a JSON file, and a row appended to BENCHMARKS.md."""

from __future__ import annotations

import datetime
import json
import os

HEADER = ("| date | GPU | command | result | baseline (same run) | ratio | % roofline |\n"
          "|---|---|---|---|---|---|---|\n")


def append_benchmarks_row(path: str, gpu: str, command: str, result: str, baseline: str, ratio: str,
                          roofline: str) -> None:
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("# Benchmarks\n\nEvery row comes from `meshserve bench ...` on the device, with its baseline "
                    "measured in the same run.\n\n" + HEADER)
        date = datetime.date.today().isoformat()
        f.write(f"| {date} | {gpu} | `{command}` | {result} | {baseline} | {ratio} | {roofline} |\n")


def write_json(path: str | None, results: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


def print_table(results: dict) -> None:
    width = max(len(k) for k in results)
    for k, v in results.items():
        v = f"{v:,.2f}" if isinstance(v, float) else v
        print(f"{k:<{width}}  {v}")


def print_rows(rows: list[dict]) -> None:
    """Rows of equal keys as a Markdown table (pastes into BENCHMARKS.md)."""
    if not rows:
        return
    keys = list(rows[0])
    fmt = [[f"{r[k]:,.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for cells in fmt:
        print("| " + " | ".join(cells) + " |")
