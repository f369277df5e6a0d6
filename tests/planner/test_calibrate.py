"""Calibration: per-GPU efficiency = geometric mean of measured / predicted, and every row reported."""

import dataclasses
import json

import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.planner.calibrate import calibrate, calibration_markdown, read_bench_rows
from meshserve.planner.hardware import get_gpu, load_catalog
from meshserve.planner.model import load_model
from meshserve.planner.parallel import Layout
from meshserve.planner.perf import Workload, predict


def _peak(model, batch, workload, gpu="H100-SXM", layout=None, efficiency=1.0, overhead_us=0.0):
    spec = dataclasses.replace(get_gpu(gpu), layer_overhead_us=overhead_us)
    return predict(load_model(model), layout or Layout(), spec, batch, workload,
                   efficiency=efficiency).output_tok_per_s


def test_fit_recovers_a_known_layer_overhead(tmp_path):
    """Small and large models at several batches, made with efficiency 0.7 and 50 µs per layer."""
    rows = [{"gpu": "H100-SXM", "model": m, "batch": b, "input_len": 128, "output_len": 128,
             "output_tok_per_s": _peak(m, b, Workload(128, 128), efficiency=0.7, overhead_us=50.0)}
            for m in ("qwen3-0.6b", "llama-3.1-8b") for b in (1, 8, 64)]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"results": rows}))
    cal = calibrate(read_bench_rows(path), load_catalog())
    assert cal.overheads_us["H100-SXM"] == pytest.approx(50.0)
    assert cal.factors["H100-SXM"] == pytest.approx(0.7, rel=0.03)
    assert all(abs(r.error) < 0.03 for r in cal.rows)


def test_fit_recovers_a_known_efficiency(tmp_path):
    rows = [{"gpu": "NVIDIA H100 80GB HBM3", "model": "llama-3.1-8b", "batch": 1, "workload": "W1",
             "output_tok_per_s": 0.7 * _peak("llama-3.1-8b", 1, Workload(128, 256))},
            {"gpu": "H100-SXM", "model": "qwen3-0.6b", "batch": 32, "input_len": 512, "output_len": 128,
             "output_tok_per_s": 0.7 * _peak("qwen3-0.6b", 32, Workload(512, 128))},
            {"gpu": "H200", "model": "llama-3.1-8b", "tp": 2, "batch": 8, "tok_per_s":
             0.9 * _peak("llama-3.1-8b", 8, Workload(), "H200", Layout(tp=2))}]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"results": rows}))
    cal = calibrate(read_bench_rows(path), load_catalog())
    assert cal.factors["H100-SXM"] == pytest.approx(0.7, rel=0.05)
    assert cal.factors["H200"] == pytest.approx(0.9, rel=0.05)
    assert len(cal.rows) == 3 and all(abs(r.error) < 0.05 for r in cal.rows)
    table = calibration_markdown(cal)
    assert "| H100-SXM | llama-3.1-8b | TP=1 | 1 | W1 |" in table and "Fitted H200: efficiency" in table


def test_bad_bench_files(tmp_path):
    with pytest.raises(InvalidArgumentError, match="not found"):
        read_bench_rows(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(InvalidArgumentError, match="list of result objects"):
        read_bench_rows(tmp_path / "x.json")
    with pytest.raises(InvalidArgumentError, match="output_tok_per_s"):
        calibrate([{"gpu": "H100-SXM", "model": "llama-3.1-8b"}], load_catalog())
