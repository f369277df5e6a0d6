"""Step durations: the calibration file is the fit of the trace it names; GPUs and TP scale it sensibly."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshserve.engine.step_time import DeviceRates, StepShape
from meshserve.planner.hardware import get_gpu
from meshserve.planner.memory import stage_shard
from meshserve.planner.model import load_model
from meshserve.planner.parallel import Layout
from meshserve.simulator.step_cost import StepCost, fit_step_weights, load_calibration, read_step_trace

TRACE = Path(__file__).resolve().parents[2] / "benchmarks/results/w3_8b_slo_credit_steps.jsonl.gz"


@pytest.mark.skipif(not TRACE.is_file(), reason="step trace not in this checkout")
def test_calibration_is_the_fit_of_its_trace():
    gpu, shard = get_gpu("H200"), stage_shard(load_model("llama-3.1-8b"), Layout(), 0)
    rows = read_step_trace(TRACE)
    fitted, err = fit_step_weights(rows, shard.weight_bytes, shard.kv_bytes_per_token,
                                   DeviceRates(gpu.hbm_bytes_per_s, gpu.flops_per_s("bf16")))
    stored = load_calibration()
    assert fitted.as_tuple() == pytest.approx(stored.as_tuple(), abs=1e-3)
    assert err < 0.10  # mean |predicted - measured| / measured per step
    # and the fitted model reproduces the trace's total device time
    cost = StepCost(load_model("llama-3.1-8b"), gpu)
    total = sum(cost(StepShape(r["tokens"], r["seqs"], r["context"])) for r in rows)
    assert total == pytest.approx(sum(r["actual_s"] for r in rows), rel=0.01)


def test_gpus_and_tensor_parallelism():
    model = load_model("llama-3.1-8b")
    decode = StepShape(64, 64, 64 * 600)
    h100, h200 = StepCost(model, get_gpu("H100-SXM")), StepCost(model, get_gpu("H200"))
    assert h100(decode) > h200(decode)  # less bandwidth
    assert h100(decode) / h200(decode) == pytest.approx(4800 / 3350, rel=0.1)
    tp2 = StepCost(model, get_gpu("H100-SXM"), tp=2)
    assert tp2.comm_s(64) > 0 and h100.comm_s(64) == 0
    assert tp2(decode) < h100(decode)  # half the weights per GPU outweighs the all-reduces
    prefill = StepShape(4096, 1, 4096)
    assert h100(prefill) > h100(decode)
