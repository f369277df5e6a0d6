"""The planner's PP ITL with the engine core's host costs (planner/pipeline_host.py): the simulator's fitted
pair, the closed form, and the order the engine measured on 2 x H200 (depth 2 slower than depth 3, the token
hand-off faster still, PP=2 slower than TP=1 for the 8B's W2)."""

import pytest

from meshserve.planner.hardware import get_gpu
from meshserve.planner.model import load_model
from meshserve.planner.parallel import Layout
from meshserve.planner.perf import itl_s, pp_hop_s
from meshserve.planner.pipeline_host import NO_HOST, PipelineHost, fitted_host
from meshserve.planner.plan import PlanRequest, make_plan
from meshserve.simulator.pipeline import load_host_costs

M, GPU = load_model("llama-3.1-8b"), get_gpu("H200")


def _itl(layout, batch, depth=0, host=NO_HOST):
    return itl_s(M, layout, GPU, batch, 824, weight_dtype="bf16", kv_dtype="bf16", gpus_per_node=8,
                 efficiency=GPU.efficiency, pipeline_depth=depth, host=host)


def test_the_fitted_host_is_the_simulators():
    sim = load_host_costs("default")
    assert fitted_host() == PipelineHost(sim.step_s, sim.round_trip_s) and sim.step_s > 0 and sim.round_trip_s > 0


@pytest.mark.parametrize("batch, depth", [(1, 2), (64, 2), (256, 3)])
def test_host_costs_enter_the_cycle_and_bound_the_step_rate(batch, depth):
    host = PipelineHost(3e-3, 2e-3)
    stages_alone, _ = _itl(Layout(pp=2), batch, depth)
    itl, slowest = _itl(Layout(pp=2), batch, depth, host)
    micro = -(-batch // depth)
    passes, _ = _itl(Layout(pp=2), micro, 1)  # one step in flight of the same micro-batch: its pass alone
    steps = min(depth, batch)  # no empty steps in flight
    assert itl == pytest.approx(max(host.step_s + host.round_trip_s + passes, steps * max(slowest.total_s, host.step_s)))
    assert itl > stages_alone


@pytest.mark.parametrize("batch", [1, 2])
def test_fewer_sequences_than_steps_in_flight_keep_fewer_steps(batch):
    """A sequence has one step in flight at a time and the engine schedules no empty step: 2 sequences at
    --pipeline-depth 8 were charged 8 turns of the host, 25.6 ms (8 x 3.2) where the simulator's engine scheduler
    gives ~10.8 ms at any depth; the roofline likewise read the weights 8 times for 2 tokens."""
    host = fitted_host()
    at_depth = {d: _itl(Layout(pp=2), batch, d, host)[0] for d in (2, 4, 8)}
    assert at_depth[8] == pytest.approx(at_depth[4]) == pytest.approx(at_depth[2]) and at_depth[8] < 0.012
    plans = [make_plan(PlanRequest(model=M, gpu=GPU, num_gpus=2, pp=2, concurrency=batch, pipeline_depth=d)).best
             for d in (2, 8)]
    assert plans[0].prediction.roofline_tok_per_s == pytest.approx(plans[1].prediction.roofline_tok_per_s)
    assert plans[1].prediction.roofline_tok_per_s == pytest.approx(batch * 4.8e12 / (min(2, batch) * 16.06e9 / 2),
                                                                  rel=0.01)


def test_the_handoff_splits_the_batch_pp_ways_and_hides_the_round_trip():
    host = PipelineHost(3e-3, 50e-3, token_handoff=True)  # a long round trip: only the depth bound feels it
    batch = 256
    one, slowest = _itl(Layout(pp=2), batch // 2, 1)  # a pp-way step's pass
    itl, _ = _itl(Layout(pp=2), batch, 3, host)
    assert itl == pytest.approx(max(one, 2 * max(slowest.total_s, host.step_s, (host.step_s + host.round_trip_s + one) / 3)))
    assert pp_hop_s(M, GPU, batch // 2) > 0


def test_the_measured_order_on_two_h200s():
    """W2 8B on 2 x H200 measured 15.90 s at PP=2 depth 2, 14.64 at depth 3, 11.37 with the hand-off, 13.83 at
    TP=1 (PLANNER.md): with the fitted host the planner orders them so at W2's starting batch; without it, PP=2
    came out faster than TP=1 at depth 2 and depth 3 slower than depth 2."""
    host, batch = fitted_host(), 256
    tp1 = _itl(Layout(), batch)[0]
    d2, d3 = _itl(Layout(pp=2), batch, 2, host)[0], _itl(Layout(pp=2), batch, 3, host)[0]
    ho = _itl(Layout(pp=2), batch, 3, host.with_handoff(True))[0]
    assert d2 > d3 > tp1 > ho
    alone2, alone3 = _itl(Layout(pp=2), batch, 2)[0], _itl(Layout(pp=2), batch, 3)[0]  # the stages alone
    assert alone2 < tp1 and alone2 < alone3


def test_plan_takes_the_host_and_refuses_the_handoff_with_tp():
    req = dict(model=M, gpu=GPU, num_gpus=2, pp=2, concurrency=256, pipeline_depth=3)
    fitted = make_plan(PlanRequest(**req)).best.prediction
    free = make_plan(PlanRequest(**req, pipeline_host=NO_HOST)).best.prediction
    handoff = make_plan(PlanRequest(**req, pp_token_handoff=True)).best.prediction
    assert free.itl_s < fitted.itl_s and handoff.itl_s < fitted.itl_s
    result = make_plan(PlanRequest(model=M, gpu=GPU, num_gpus=4, tp=2, pp=2, pp_token_handoff=True))
    assert not result.candidates and any("--pp-token-handoff needs TP 1" in str(x) for x in result.rejections)


def test_the_plan_prints_the_host_it_assumed(capsys):
    from meshserve.cli import main

    assert main(["plan", "llama-3.1-8b", "--gpu", "H200", "--num-gpus", "2", "--pp", "2", "--pp-host-step-ms", "1.5"]) == 0
    assert "PP host assumed: 1.5 ms of the engine core per step + 2.6 ms round trip" in capsys.readouterr().out
    assert main(["plan", "llama-3.1-8b", "--gpu", "H200", "--num-gpus", "2", "--tp", "2"]) == 0
    assert "PP host" not in capsys.readouterr().out


def test_a_hop_carries_hidden_states_and_residual():
    """The engine's stage sends two bf16 tensors of tokens x hidden (engine/pipeline_stage.py), as the simulator's
    hop prices them: 128 tokens of the 8B are 2 x 128 x 4096 x 2 B = 2 MiB over the 50 GB/s network."""
    from meshserve.simulator.pipeline import hop_s

    assert pp_hop_s(M, GPU, 128) == pytest.approx(15e-6 + 2 * 128 * 4096 * 2 / 50e9)
    assert pp_hop_s(M, GPU, 128) == pytest.approx(hop_s(M, GPU, 128, same_node=False))
