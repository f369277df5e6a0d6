"""Calibration: fit one efficiency factor per GPU from `meshserve bench` results, and show predicted vs measured.

Input: a JSON file holding a list of result rows, {"results": [rows]}, or one row. A row:

    {"gpu": "H100-SXM",            # catalog name or driver name ("NVIDIA H100 80GB HBM3")
     "model": "llama-3.1-8b",      # planner preset, known HF id, or a config.json path
     "tp": 1, "pp": 1, "dp": 1,    # layout (default 1 each)
     "batch": 1,                   # concurrent sequences, all replicas together
     "input_len": 128, "output_len": 256,   # optional; defaults from "workload" (W1, W2) or 1024/256
     "workload": "W1",             # optional label
     "weight_dtype": "bf16", "kv_dtype": "bf16",   # optional
     "output_tok_per_s": 153.0}    # measured generated tokens per second (also read: "tok_per_s")

Two numbers are fitted per GPU: `efficiency`, the fraction of the hardware's peak bandwidth and FLOP/s the
engine reaches, and `layer_overhead_us`, a fixed time per layer per decode step (kernel launches and latencies)
that dominates small models at small batch. For each candidate overhead the efficiency is the geometric-mean
ratio of measured to predicted; the pair with the smallest squared log error wins. Put them in the catalog (or a
--hardware-file).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from meshserve.errors import InvalidArgumentError
from meshserve.planner.hardware import GpuSpec, get_gpu
from meshserve.planner.model import ModelSpec, load_model
from meshserve.planner.parallel import Layout
from meshserve.planner.perf import Workload, predict

# Request shapes of the fixed workloads in DESIGN.md (W2: means of its random lengths).
WORKLOAD_SHAPES: dict[str, Workload] = {"W1": Workload(128, 256), "W2": Workload(562, 523),
                                        "W3": Workload(512, 128)}
MEASURED_KEYS = ("output_tok_per_s", "tok_per_s", "output_throughput")


@dataclass(frozen=True)
class CalibrationRow:
    """One benchmark result beside the planner's prediction for it."""

    gpu: str
    model: str
    layout: str
    batch: int
    workload: str
    measured_tok_per_s: float
    predicted_peak_tok_per_s: float  # at efficiency 1
    predicted_tok_per_s: float  # at the fitted efficiency

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return self.predicted_tok_per_s / self.measured_tok_per_s - 1


@dataclass(frozen=True)
class Calibration:
    """Fitted efficiency and per-layer overhead per GPU name, and every row's predicted vs measured."""

    factors: dict[str, float]
    rows: list[CalibrationRow]
    overheads_us: dict[str, float] = field(default_factory=dict)


def read_bench_rows(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"calibration file not found: {p}", param="calibrate")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{p}: not valid JSON: {e}", param="calibrate") from e
    rows = data.get("results", [data]) if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise InvalidArgumentError(f"{p}: expected a list of result objects", param="calibrate")
    return rows


def _measured(row: dict, i: int) -> float:
    for key in MEASURED_KEYS:
        if isinstance(row.get(key), (int, float)) and row[key] > 0:
            return float(row[key])
    raise InvalidArgumentError(f"calibration row {i} has no positive {MEASURED_KEYS[0]}", param="calibrate")


@dataclass(frozen=True)
class _Case:
    gpu: GpuSpec
    model: ModelSpec
    layout: Layout
    batch: int
    workload_name: str
    workload: Workload
    weight_dtype: str
    kv_dtype: str
    measured: float

    def predicted(self, efficiency: float) -> float:
        return predict(self.model, self.layout, self.gpu, self.batch, self.workload, weight_dtype=self.weight_dtype,
                       kv_dtype=self.kv_dtype, efficiency=efficiency).output_tok_per_s


def _case(row: dict, i: int, catalog: dict[str, GpuSpec]) -> _Case:
    try:
        gpu = get_gpu(str(row["gpu"]), catalog)
        model = load_model(str(row["model"]))
    except KeyError as e:
        raise InvalidArgumentError(f"calibration row {i} lacks {e}", param="calibrate") from e
    name = str(row.get("workload", ""))
    shape = WORKLOAD_SHAPES.get(name.upper(), Workload())
    try:
        layout = Layout(tp=int(row.get("tp", 1)), pp=int(row.get("pp", 1)), dp=int(row.get("dp", 1)))
        workload = Workload(int(row.get("input_len", shape.input_len)), int(row.get("output_len", shape.output_len)))
        batch = int(row.get("batch", 1))
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"calibration row {i}: {e}", param="calibrate") from e
    return _Case(gpu, model, layout, batch, name, workload, row.get("weight_dtype") or model.checkpoint_dtype,
                 row.get("kv_dtype", "bf16"), _measured(row, i))


def calibrate(rows: list[dict], catalog: dict[str, GpuSpec]) -> Calibration:
    """Fit per-GPU efficiency factors to `rows` (see the module docstring for the schema)."""
    if not rows:
        raise InvalidArgumentError("calibration file holds no results", param="calibrate")
    cases = [_case(row, i, catalog) for i, row in enumerate(rows)]
    peaks = [c.predicted(1.0) for c in cases]
    factors: dict[str, float] = {}
    overheads: dict[str, float] = {}
    for name in sorted({c.gpu.name for c in cases}):
        mine = [c for c in cases if c.gpu.name == name]
        best = None
        for overhead in _OVERHEAD_GRID_US:
            trial = [replace(c, gpu=replace(c.gpu, layer_overhead_us=overhead)) for c in mine]
            eff = 1.0
            for _ in range(3):  # fixed point: the overhead term does not scale with efficiency
                logs = [math.log(c.measured / c.predicted(eff)) for c in trial]
                eff = min(1.0, eff * math.exp(sum(logs) / len(logs)))
            err = sum(math.log(c.measured / c.predicted(eff)) ** 2 for c in trial)
            if best is None or err < best[0]:
                best = (err, eff, overhead)
        _, factors[name], overheads[name] = best
    out = []
    for c, p in zip(cases, peaks):
        fitted = replace(c, gpu=replace(c.gpu, layer_overhead_us=overheads[c.gpu.name]))
        out.append(CalibrationRow(c.gpu.name, c.model.name, c.layout.label, c.batch, c.workload_name, c.measured,
                                  p, fitted.predicted(factors[c.gpu.name])))
    return Calibration(factors, out, overheads)


# candidate per-layer overheads (µs) tried by the fit
_OVERHEAD_GRID_US = [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0]


def calibration_markdown(cal: Calibration) -> str:
    """The predicted-vs-measured table PLANNER.md keeps."""
    header = ("| GPU | model | layout | batch | workload | measured tok/s | peak model tok/s | predicted tok/s "
              "| error |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in cal.rows:
        lines.append(f"| {r.gpu} | {r.model} | {r.layout} | {r.batch} | {r.workload or '-'} | "
                     f"{r.measured_tok_per_s:,.1f} | {r.predicted_peak_tok_per_s:,.1f} | "
                     f"{r.predicted_tok_per_s:,.1f} | {r.error:+.1%} |")
    lines.append("")
    lines.extend(f"Fitted {name}: efficiency {f:.3f}, layer overhead {cal.overheads_us.get(name, 0.0):.0f} µs per "
                 "layer per decode step" for name, f in sorted(cal.factors.items()))
    return "\n".join(lines)
