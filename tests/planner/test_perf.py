"""Predictions: the decode roofline, claims above it, and sane shapes of TTFT/ITL/throughput/cost."""

import pytest

from meshserve.planner.claim import check_claim
from meshserve.planner.cost import deployment_cost
from meshserve.planner.hardware import get_gpu
from meshserve.planner.model import load_model
from meshserve.planner.parallel import Layout
from meshserve.planner.perf import Workload, allreduce_s, expected_experts_touched, predict
from meshserve.planner.plan import PlanRequest, make_plan


def test_70b_tp4_batch32_decode_roofline():
    m, gpu = load_model("llama-3.1-70b"), get_gpu("H100-SXM")
    p = predict(m, Layout(tp=4), gpu, 32, Workload())
    assert round(p.roofline_bytes_per_gpu / 1e9, 1) == 35.3
    assert p.roofline_tok_per_s == pytest.approx(32 / (p.roofline_bytes_per_gpu / 3.35e12))
    assert 2_950 < p.roofline_tok_per_s < 3_100  # "at most ~3,000 tok/s"
    assert p.decode_tok_per_s <= p.roofline_tok_per_s and p.output_tok_per_s <= p.decode_tok_per_s
    assert p.decode_tok_per_s <= 3_100


def test_claim_above_roofline_is_impossible():
    result = make_plan(PlanRequest(model=load_model("llama-3.1-70b"), gpu=get_gpu("H100-SXM"), num_gpus=4,
                                   concurrency=32))
    bad = check_claim(result.best, 5_000, 3350)
    assert bad.impossible and bad.message.startswith("IMPOSSIBLE") and "35.3 GB per GPU" in bad.message
    fine = check_claim(result.best, 2_000, 3350)
    assert not fine.impossible


def test_efficiency_scales_predictions():
    m, gpu = load_model("llama-3.1-8b"), get_gpu("H100-SXM")
    full = predict(m, Layout(), gpu, 1, Workload(128, 256), efficiency=1.0)
    half = predict(m, Layout(), gpu, 1, Workload(128, 256), efficiency=0.5)
    assert half.itl_s == pytest.approx(2 * full.itl_s)
    # batch 1 on H100: 16.06 GB / 3.35 TB/s ≈ 4.8 ms per token, ~209 tok/s ceiling
    assert full.roofline_tok_per_s == pytest.approx(3.35e12 / 16.06e9, rel=0.01)


def test_tensor_parallel_lowers_itl_but_adds_communication():
    m, gpu = load_model("llama-3.1-8b"), get_gpu("H100-SXM")
    one = predict(m, Layout(tp=1), gpu, 1, Workload())
    eight = predict(m, Layout(tp=8), gpu, 1, Workload())
    assert eight.itl_s < one.itl_s and eight.step.comm_s > 0 and one.step.comm_s == 0
    assert eight.ttft_s < one.ttft_s


def test_pipeline_parallel_does_not_cut_decode_latency():
    m, gpu = load_model("llama-3.1-405b"), get_gpu("H100-SXM")
    p = predict(m, Layout(tp=8, pp=2), gpu, 1, Workload())
    assert p.itl_s > 811e9 / 8 / 3.35e12  # each token still passes both stages


def test_prefill_is_compute_bound_for_long_prompts():
    m, gpu = load_model("llama-3.1-8b"), get_gpu("H100-SXM")
    p = predict(m, Layout(), gpu, 1, Workload(8192, 16), efficiency=1.0)
    flops = 2 * (m.active_params - m.embedding_params) * 8192
    assert p.ttft_s >= flops / 989e12


def test_moe_reads_only_routed_experts():
    assert expected_experts_touched(8, 2, 1) == pytest.approx(2)
    assert expected_experts_touched(128, 8, 1000) == pytest.approx(128, rel=1e-3)
    m, gpu = load_model("qwen3-30b-a3b"), get_gpu("H100-SXM")
    p1 = predict(m, Layout(), gpu, 1, Workload(), efficiency=1.0)
    assert p1.roofline_bytes_per_gpu < 0.2 * m.total_params * 2  # ~3.3 B active of 30.5 B


def test_allreduce_and_cost():
    assert allreduce_s(1e6, 1, 450, 8) == 0
    assert allreduce_s(450e9, 2, 450, 0) == pytest.approx(1.0)
    cost = deployment_cost(get_gpu("H100-SXM"), 8, 10_000)
    assert cost.usd_per_hour == 24 and cost.usd_per_million_output_tokens == pytest.approx(24 / 36e6 * 1e6)
