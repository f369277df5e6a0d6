"""One row of tools/w1_ab_device.sh: the columns of a `bench latency` or `bench throughput` JSON, six fields.

usage: python tools/w1_ab_row.py RESULT.json

latency:    tok/s, decode tok/s, decode graph ms, graph ms averaged over W1's steps, decode token ms, SM MHz median
throughput: output tok/s, W2 seconds (the median run), every run's seconds, every run's SM MHz median and power
            median (W), "-" ("/" between runs; "-" where a field is missing)
"""

from __future__ import annotations

import json
import sys


def _joined(values) -> str:
    return "/".join(values) or "-"


def row(result: dict) -> list[str]:
    if "output_tok_s" in result:
        gpu = result.get("gpu_clock_runs", [])
        return [f"{result['output_tok_s']:.1f}", f"{result['seconds']:.3f}",
                _joined(f"{s:.2f}" for s in result.get("seconds_runs", [])),
                _joined(f"{g['sm_mhz_min_median'][1]:.0f}" for g in gpu),
                _joined(f"{g['power_w_median_max'][0]:.0f}" for g in gpu if g.get("power_w_median_max")), "-"]
    return [f"{result['tok_s']:.1f}", f"{result['decode_tok_s']:.1f}", f"{result.get('decode_graph_ms', 0):.3f}",
            f"{result.get('decode_graph_ms_steps', 0):.3f}", f"{result.get('decode_token_ms', 0):.3f}",
            f"{result.get('sm_clock_mhz_min_median', [0, 0])[1]:.0f}"]


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(" ".join(row(json.load(f))))
