"""Step durations: the calibration file is the fit of the trace it names; GPUs and TP scale it sensibly."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from meshserve.engine.step_time import DeviceRates, StepShape
from meshserve.errors import InvalidArgumentError
from meshserve.planner.hardware import get_gpu
from meshserve.planner.memory import stage_shard
from meshserve.planner.model import load_model
from meshserve.planner.parallel import Layout
from meshserve.simulator.step_cost import StepCost, fit_step_weights, load_calibration, read_step_trace

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks/results"
SECTIONS = {"h200_before_mixed_graphs": "w3_8b_slo_credit_steps.jsonl.gz",
            "h200_mixed_graphs": "w3_8b_slo_graphs1024_steps.jsonl.gz"}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_calibration_is_the_fit_of_its_trace(section):
    trace = RESULTS / SECTIONS[section]
    if not trace.is_file():
        pytest.skip("step trace not in this checkout")
    gpu, shard = get_gpu("H200"), stage_shard(load_model("llama-3.1-8b"), Layout(), 0)
    rows = read_step_trace(trace)
    fitted, err = fit_step_weights(rows, shard.weight_bytes, shard.kv_bytes_per_token,
                                   DeviceRates(gpu.hbm_bytes_per_s, gpu.flops_per_s("bf16")))
    stored = load_calibration(section)
    assert fitted.as_tuple() == pytest.approx(stored.as_tuple(), abs=1e-3)
    assert err < 0.10  # mean |predicted - measured| / measured per step
    # and the fitted model reproduces the trace's total device time
    cost = StepCost(load_model("llama-3.1-8b"), gpu, weights=stored)
    total = sum(cost(StepShape(r["tokens"], r["seqs"], r["context"])) for r in rows)
    assert total == pytest.approx(sum(r["actual_s"] for r in rows), rel=0.01)


def test_default_is_the_fit_of_the_engine_with_mixed_step_graphs():
    """"default" is an alias of a section, not a third set of numbers; other names are refused."""
    assert load_calibration() == load_calibration("default") == load_calibration("h200_mixed_graphs")
    assert load_calibration() != load_calibration("h200_before_mixed_graphs")
    with pytest.raises(InvalidArgumentError, match="h200_before_mixed_graphs"):
        load_calibration("h100")


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


def test_time_s_is_the_models_prediction_to_the_bit():
    """StepCost.time_s (the fast replica's per-step price, no StepShape built) and StepCost(shape) are one
    computation, with the mixed-step graphs' threshold too."""
    rng = random.Random(0)
    for tp, graphed in ((1, 0), (2, 0), (1, 512)):
        cost = StepCost(load_model("llama-3.1-8b"), get_gpu("H100-SXM"), tp)
        cost.model.graphed_mixed_tokens = graphed
        for _ in range(2000):
            seqs = rng.randint(1, 256)
            tokens = rng.randint(seqs, 9000)
            context = rng.randint(tokens, 300_000)
            assert cost.time_s(tokens, seqs, context) == cost(StepShape(tokens, seqs, context))
        a, b = cost.decode_line(12, 7000)
        assert a + 3 * b == pytest.approx(cost(StepShape(12, 12, 7000 + 36)), rel=1e-12)
