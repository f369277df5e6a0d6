"""serve --auto: from simulated visible-GPU lists to the layout and its one-line reason."""

import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.planner.auto import choose_layout_for_visible_gpus
from meshserve.planner.parallel import Layout

H100 = "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize("model, gpus, kw, expected", [
    ("llama-3.1-8b", [H100], {}, Layout(tp=1)),
    ("llama-3.1-8b", [H100] * 8, {}, Layout(tp=1, dp=8)),
    ("llama-3.1-70b", [H100] * 4, {}, Layout(tp=4)),
    ("llama-3.1-70b", [H100] * 8, {"objective": "latency"}, Layout(tp=8)),
    ("llama-3.1-405b", ["NVIDIA H200"] * 8, {}, Layout(tp=8)),
    ("llama-3.1-405b", [H100] * 8, {"nodes": 2}, Layout(tp=8, pp=2)),
])
def test_auto_picks_expected_layout(model, gpus, kw, expected):
    choice = choose_layout_for_visible_gpus(model, gpus, **kw)
    assert choice.layout == expected
    assert choice.reason.startswith(f"{len(gpus) * kw.get('nodes', 1)}× ") and expected.label in choice.reason
    assert "\n" not in choice.reason


def test_auto_errors_are_one_line():
    with pytest.raises(InvalidArgumentError, match="no GPUs visible"):
        choose_layout_for_visible_gpus("llama-3.1-8b", [])
    with pytest.raises(InvalidArgumentError, match="mixed GPU types"):
        choose_layout_for_visible_gpus("llama-3.1-8b", [H100, "NVIDIA A100-SXM4-80GB"])
    with pytest.raises(InvalidArgumentError, match="no layout of 8× H100-SXM fits llama-3.1-405b") as e:
        choose_layout_for_visible_gpus("llama-3.1-405b", [H100] * 8)
    assert "\n" not in str(e.value)


def test_auto_launches_no_expert_parallel_layout():
    """serve --auto starts TP x PP x DP without --enable-expert-parallel: the plan's EP rows (Mixtral's best on
    8 H100s is TP=1×DP=8×EP=8, 14.5 GB of weights per GPU) would start as TP=1×DP=8, 93 GB per GPU."""
    choice = choose_layout_for_visible_gpus("mixtral-8x7b", [H100] * 8)
    assert choice.plan.best.layout.ep > 1 and choice.layout.ep == 1
    assert choice.layout in [c.layout for c in choice.plan.candidates]  # a row that fits as launched
    assert "needs EP" in choice.reason and choice.layout.label in choice.reason and "\n" not in choice.reason
    v3 = choose_layout_for_visible_gpus("deepseek-v3", ["NVIDIA H200"] * 8)  # TP=1×DP=8 would need 673 GB a GPU
    assert v3.plan.best.layout == Layout(dp=8, ep=8) and v3.layout == Layout(tp=8)
