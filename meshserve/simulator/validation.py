"""Replays of measured runs: W3 on one H200 (Llama-3.1-8B), predicted vs measured, as a markdown table.

`python -m meshserve.simulator.validation` reads the measured points from benchmarks/results/ (the JSON that
`meshserve bench serve` wrote in those runs), simulates each QPS with W3's exact arrivals and the same server
settings, and prints one row per point.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.trace import w3_trace

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@dataclass(frozen=True)
class MeasuredRun:
    """A measured W3 sweep and the server settings it ran with."""

    label: str
    file: str
    slo: bool  # --slo-ttft-ms 1000 --slo-tpot-ms 50


# No targets: issue 17's "after" run; targets: issue 18's committed credit policy (whose step trace calibrated
# the simulator), with QPS 32 from the first-policy run (a policy that does not bind at 32).
W3_H200_RUNS = (
    MeasuredRun("no targets", "w3_8b_wordtok_after_split.json", slo=False),
    MeasuredRun("targets", "w3_8b_slo_first.json", slo=True),
    MeasuredRun("targets", "w3_8b_slo_credit.json", slo=True),
)
METRICS = ("goodput", "ttft_p50", "tpot_p50", "itl_p50", "ttft_p99")


def measured_points(run: MeasuredRun) -> dict[float, dict]:
    data = json.loads((RESULTS / run.file).read_text())
    return {float(p["qps"]): p for p in data["points"]}


def replay_w3(qps: float, slo: bool, frontend_latency_s: float = 0.0) -> dict:
    config = SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=1, max_model_len=4096,
                       slo_ttft_s=1.0 if slo else None, slo_tpot_s=0.05 if slo else None,
                       frontend_latency_s=frontend_latency_s)
    return simulate(config, w3_trace(qps))


def frontend_latency_from(qps: float, measured_ttft_p50: float, slo: bool) -> float:
    """The front end's latency (HTTP, tokenizer, the hop to the core) that the engine-only simulation does not
    see: measured TTFT p50 minus simulated, at a light load where queueing is negligible."""
    return max(0.0, measured_ttft_p50 - replay_w3(qps, slo)["ttft_p50"])


def _cell(pred: float, meas: float, scale: float) -> str:
    if meas * scale < 0.5:  # the client saw tokens in bursts (ITL p50 ~0): no measurement to compare
        return f"{pred * scale:.1f} / -"
    return f"{pred * scale:.1f} / {meas * scale:.1f} ({(pred - meas) / meas:+.0%})"


def table(runs=W3_H200_RUNS, calibration_qps: float = 32.0) -> str:
    """Markdown: predicted / measured (error) per metric and point; later runs of a label win a QPS. The
    front-end latency of each label is fitted at calibration_qps (its row is marked) and used for the rest."""
    chosen: dict[tuple[str, float], tuple[MeasuredRun, dict]] = {}
    for run in runs:
        for qps, point in measured_points(run).items():
            chosen[(run.label, qps)] = (run, point)
    latency = {label: frontend_latency_from(qps, meas["ttft_p50"], run.slo)
               for (label, qps), (run, meas) in chosen.items() if qps == calibration_qps}
    lines = [("| server | QPS | goodput req/s | TTFT p50 ms | TPOT p50 ms | ITL p50 ms | TTFT p99 ms | "
             "refused (sim / measured) | measured in |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for (label, qps), (run, meas) in sorted(chosen.items()):
        pred = replay_w3(qps, run.slo, latency.get(label, 0.0))
        mark = f" (front end {latency[label] * 1e3:.0f} ms fitted here)" if qps == calibration_qps else ""
        lines.append(
            f"| {label}{mark} | {qps:g} | {_cell(pred['goodput'], meas['goodput'], 1)} | "
            f"{_cell(pred['ttft_p50'], meas['ttft_p50'], 1e3)} | {_cell(pred['tpot_p50'], meas['tpot_p50'], 1e3)} | "
            f"{_cell(pred['itl_p50'], meas['itl_p50'], 1e3)} | {_cell(pred['ttft_p99'], meas['ttft_p99'], 1e3)} | "
            f"{pred['failed']} / {meas.get('failed', 0)} | `{run.file}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(calibration_qps=float(sys.argv[1]) if len(sys.argv) > 1 else 32.0))
