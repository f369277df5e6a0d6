"""The expert-parallel exchange bytes the planner predicts, against counts made by hand and by simulation."""

from __future__ import annotations

import random

import pytest

from meshserve.planner.model import load_model
from meshserve.planner.moe_comm import ep_traffic, remote_ranks_per_token, tp_moe_all_reduce_bytes


def test_remote_ranks_match_a_simulated_router():
    rng = random.Random(0)
    for experts, k, ep in ((128, 8, 2), (8, 2, 2), (128, 8, 4), (8, 2, 8)):
        per_rank = experts // ep
        trials = 20000
        hits = sum(len({e // per_rank for e in rng.sample(range(experts), k)} - {0}) for _ in range(trials))
        # a token of rank 0's slice reaches the other ranks holding any of its experts
        assert remote_ranks_per_token(experts, k, ep) == pytest.approx(hits / trials, rel=0.03)
    assert remote_ranks_per_token(8, 2, 1) == 0.0
    assert remote_ranks_per_token(8, 8, 4) == 3.0  # every expert chosen: every rank reached


def test_qwen3_moe_ep2_traffic_by_hand():
    model = load_model("qwen3-30b-a3b")
    t = ep_traffic(model, ep=2, tokens=256, moe_layers=48)
    reach = 1 - (64 * 63 * 62 * 61 * 60 * 59 * 58 * 57) / (128 * 127 * 126 * 125 * 124 * 123 * 122 * 121)
    rows = 128 * reach  # tokens of this rank's slice that go to the other rank
    assert t.dispatch == pytest.approx(48 * rows * (2048 * 2 + 8 * 2 * 4))
    assert t.combine == pytest.approx(48 * rows * 2048 * 2)
    assert t.all_gather == pytest.approx(48 * 128 * 2048 * 2)
    # about 1.5x the bytes of TP's all-reduce for the same layers (which also needs no host sync)
    assert t.total / tp_moe_all_reduce_bytes(model, 2, 256, 48) == pytest.approx(1.5, abs=0.05)
    assert ep_traffic(model, ep=1, tokens=256, moe_layers=48).total == 0.0


def test_plan_reports_ep_exchange(capsys):
    from meshserve.cli import main

    assert main(["plan", "qwen3-30b-a3b", "--gpu", "H200", "--num-gpus", "2", "--tp", "2", "--enforce-eager"]) == 0
    out = capsys.readouterr().out
    assert "3.35 B active per token" in out
    line = next(x for x in out.splitlines() if x.startswith("EP TP=2×EP=2:"))
    assert "MB sent per GPU per decode step in the all-to-all" in line
    assert "TP's all-reduce of the same layers" in line


def test_plan_ep_note_describes_the_step_it_priced(capsys):
    """With PP the note's bytes are one step in flight's (⌈batch / 2⌉ sequences) through the slowest stage (30 of
    DeepSeek-V3's 58 MoE layers: its 3 dense ones are on the first stage), and TP's all-reduce beside them is for
    the same step, not the whole batch over half the model's MoE layers."""
    from meshserve.cli import main

    assert main(["plan", "deepseek-v3", "--gpu", "H200", "--num-gpus", "16", "--nodes", "2", "--tp", "8",
                 "--pp", "2", "--enforce-eager"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("EP TP=8×PP=2×EP=8:"))
    assert "(30 MoE layers, 256 tokens)" in line  # 512 sequences per replica, 2 steps in flight
    tp_reduce = 30 * 2 * 7 / 8 * 256 * 7168 * 2  # ring all-reduce of 256 x h bf16 per MoE layer
    assert f"TP's all-reduce of the same layers: {tp_reduce / 1e6:,.1f} MB" in line


def test_decode_ep_inside_cuda_graphs_is_an_all_reduce(capsys):
    """Inside a CUDA graph the engine cannot size an all-to-all: every rank runs its experts on all the tokens
    and one all-reduce per MoE layer sums them (layers/fused_moe.py), TP's collective; decode replays graphs
    unless --enforce-eager, so EP's decode step costs TP's communication, and the note says which is which."""
    from meshserve.cli import main
    from meshserve.planner.hardware import get_gpu
    from meshserve.planner.parallel import Layout
    from meshserve.planner.perf import decode_stage_time

    model, gpu = load_model("qwen3-30b-a3b"), get_gpu("H100-SXM")
    kw = dict(weight_dtype="bf16", kv_dtype="bf16", gpus_per_node=8, efficiency=1.0)
    tp = decode_stage_time(model, Layout(tp=4), gpu, 0, 256, 1000, **kw)
    graph = decode_stage_time(model, Layout(tp=4, ep=4), gpu, 0, 256, 1000, **kw)
    eager = decode_stage_time(model, Layout(tp=4, ep=4), gpu, 0, 256, 1000, cuda_graphs=False, **kw)
    assert graph.comm_s == tp.comm_s and graph.ep_bytes == tp_moe_all_reduce_bytes(model, 4, 256, 48)
    assert eager.comm_s > tp.comm_s and eager.ep_bytes == ep_traffic(model, 4, 256, 48).total
    assert main(["plan", "qwen3-30b-a3b", "--gpu", "H100-SXM", "--num-gpus", "4", "--tp", "4"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("EP TP=4×EP=4:"))
    assert f"{graph.ep_bytes / 1e6:,.1f} MB sent per GPU per decode step, TP's all-reduce" in line
    assert f"the all-to-all exchange sends {eager.ep_bytes / 1e6:,.1f} MB" in line
