"""--search: every TP x DP layout that fits, ranked by goodput per fleet dollar-hour."""

from __future__ import annotations

import json

from meshserve.cli import main
from meshserve.simulator.config import SimConfig
from meshserve.simulator.search import candidate_configs, search_layouts
from meshserve.simulator.trace import poisson_trace


def test_candidates_are_the_planners_layouts_that_fit():
    configs, skipped = candidate_configs(SimConfig(model="llama-3.1-70b", gpu="H100-SXM"), [1, 2, 4])
    assert sorted((c.num_gpus, c.tp) for c in configs) == [(2, 2), (4, 2), (4, 4)]
    assert any("TP=1" in s and "KV room" in s for s in skipped)  # 141 GB of weights on one 80 GB GPU
    assert any("PP=2" in s for s in skipped)


def test_light_load_ranks_the_smallest_fleet_first():
    """Four requests a second: every layout serves them all, so the cheapest fleet gives most goodput per $."""
    result = search_layouts(SimConfig(gpu="H100-SXM"), poisson_trace(4.0, 10.0, 0), [1, 2])
    ranked = result["ranked"]
    assert next((r["num_gpus"], r["tp"]) for r in ranked) == (1, 1)
    assert {(r["num_gpus"], r["tp"]) for r in ranked} == {(1, 1), (2, 1), (2, 2)}
    assert all(r["failed"] == 0 for r in ranked)
    per_dollar = [r["goodput_per_usd_hour"] for r in ranked]
    assert per_dollar == sorted(per_dollar, reverse=True)


def test_search_flag(capsys):
    assert main(["simulate", "--gpu", "H100-SXM", "--search", "--search-gpus", "1,2", "--qps", "4",
                 "--duration", "5", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["best"] == out["ranked"][0] and out["price_is_assumption"] is True
    assert main(["simulate", "--search", "--search-gpus", "two", "--no-progress"]) == 2


def test_layouts_the_other_flags_cannot_run_are_left_out():
    """--disaggregation 1:1 needs two replicas: on 2 GPUs TP=1 x DP=2 runs, TP=2 x DP=1 is skipped, not fatal."""
    configs, skipped = candidate_configs(SimConfig(gpu="H100-SXM", num_gpus=2, disaggregation=(1, 1)), [2])
    assert [(c.num_gpus, c.tp) for c in configs] == [(2, 1)]
    assert any("TP=2" in s and "--disaggregation 1:1" in s for s in skipped)


def test_moe_layouts_take_expert_parallel_within_a_replica():
    """A MoE model's EP layouts run where EP spans one replica's TP ranks (the engine's flag), and are left out
    where the planner spreads experts over DP replicas too."""
    configs, skipped = candidate_configs(SimConfig(model="qwen3-30b-a3b", gpu="H200"), [2])
    got = {(c.tp, c.num_replicas, c.enable_expert_parallel) for c in configs}
    assert (2, 1, True) in got and (2, 1, False) in got and (1, 2, False) in got
    assert all(c.layout.ep == (c.tp if c.enable_expert_parallel else 1) for c in configs)
    assert any("DP=2" in s and "EP=2" in s and "one replica's TP ranks" in s for s in skipped)
    ranked = search_layouts(SimConfig(model="qwen3-30b-a3b", gpu="H200"), poisson_trace(2.0, 5.0, 0), [2])["ranked"]
    assert sorted((r["tp"], r["ep"]) for r in ranked) == [(1, 1), (2, 1), (2, 2)]
    assert any(r["layout"].endswith("EP=2") for r in ranked)
