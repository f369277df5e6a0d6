"""Layout choice: what fits where, and one-line reasons for every rejected layout."""

import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.planner.hardware import get_gpu
from meshserve.planner.layout import enumerate_layouts
from meshserve.planner.model import load_model
from meshserve.planner.parallel import Layout
from meshserve.planner.plan import PlanRequest, make_plan


def plan(model, gpu="H100-SXM", num_gpus=1, **kw):
    return make_plan(PlanRequest(model=load_model(model), gpu=get_gpu(gpu), num_gpus=num_gpus, **kw))


def test_8b_on_one_h100_is_tp1():
    assert plan("llama-3.1-8b").best.layout == Layout(tp=1)


def test_8b_on_eight_h100_uses_data_parallel_for_throughput():
    assert plan("llama-3.1-8b", num_gpus=8).best.layout == Layout(tp=1, dp=8)
    assert plan("llama-3.1-8b", num_gpus=8, max_model_len=8192).best.layout == Layout(tp=1, dp=8)


def test_8b_latency_objective_prefers_tensor_parallel():
    assert plan("llama-3.1-8b", num_gpus=8, objective="latency").best.layout == Layout(tp=8)


def test_70b_bf16_on_four_h100_is_tp4():
    result = plan("llama-3.1-70b", num_gpus=4)
    assert result.best.layout == Layout(tp=4) and len(result.candidates) == 1
    assert any(x.layout == Layout(tp=2, dp=2) and "GB usable" in x.reason for x in result.rejections)


def test_405b_needs_two_h100_nodes_or_one_h200_node():
    one_node = plan("llama-3.1-405b", num_gpus=8)
    assert one_node.best is None and "no layout" in one_node.reason
    assert any(x.layout == Layout(tp=8) and "GB usable" in x.reason for x in one_node.rejections)
    assert plan("llama-3.1-405b", num_gpus=16, nodes=2).best.layout == Layout(tp=8, pp=2)
    assert plan("llama-3.1-405b", gpu="H200", num_gpus=8).best.layout == Layout(tp=8)


def test_70b_tp3_is_rejected_with_its_reason():
    result = plan("llama-3.1-70b", num_gpus=3)
    lines = [str(x) for x in result.rejections]
    assert "TP=3: 64 heads not divisible by 3" in lines
    six = [str(x) for x in plan("llama-3.1-70b", num_gpus=6, max_model_len=8192).rejections]
    assert "TP=3×DP=2: 64 heads not divisible by 3" in six
    assert all("\n" not in line for line in six)


def test_structural_rules():
    m = load_model("llama-3.1-70b")
    ok, rejected = enumerate_layouts(m, 16, gpus_per_node=8, nodes=2)
    reasons = {x.layout: x.reason for x in rejected}
    assert "stays in a node" in reasons[Layout(tp=16)]
    assert "needs 4 nodes" in reasons[Layout(tp=4, pp=4)]
    assert Layout(tp=8, pp=2) in ok and Layout(tp=8, dp=2) in ok
    ok_pinned, _ = enumerate_layouts(m, 16, gpus_per_node=8, nodes=2, pp_in_node=True)
    assert Layout(tp=4, pp=4) in ok_pinned  # stages may share a node when the user asks for them


def test_pinned_pp_on_one_node_is_planned_as_serve_runs_it():
    # `meshserve serve -pp 2` runs on one machine, so the planner answers for it instead of "needs 2 nodes"
    result = plan("llama-3.1-8b", gpu="H200", num_gpus=2, pp=2, max_model_len=4096)
    assert result.best is not None and result.best.layout == Layout(pp=2)
    assert plan("llama-3.1-8b", gpu="H200", num_gpus=2, max_model_len=4096).best.layout.pp == 1


def test_moe_adds_expert_parallel_layouts():
    m = load_model("mixtral-8x7b")
    ok, _ = enumerate_layouts(m, 8, gpus_per_node=8)
    assert Layout(tp=8, ep=8) in ok and Layout(tp=1, dp=8, ep=8) in ok and Layout(tp=8) in ok
    _, rej6 = enumerate_layouts(m, 6, gpus_per_node=8)
    assert any("8 experts not divisible by EP=6" in x.reason for x in rej6)


def test_pinned_layout_and_request_errors():
    assert [c.layout for c in plan("llama-3.1-8b", num_gpus=8, tp=2).candidates] == [Layout(tp=2, dp=4)]
    with pytest.raises(InvalidArgumentError, match="--nodes 2"):
        plan("llama-3.1-8b", num_gpus=16)
    with pytest.raises(InvalidArgumentError, match="exceeds max_model_len"):
        plan("llama-3.1-8b", max_model_len=512)


def test_concurrency_beyond_what_fits_is_predicted_at_the_maximum():
    # 70B TP=4 holds ~256 workload-length sequences per replica, not 10,000: the rest would queue.
    best = plan("llama-3.1-70b", num_gpus=4, concurrency=10_000).best
    assert best.layout == Layout(tp=4) and best.clamped and best.prediction.concurrency == best.max_concurrency
