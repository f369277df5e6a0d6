"""Pipeline-parallel replicas (meshserve/simulator/pipeline.py) against cases with known answers."""

from __future__ import annotations

import pytest

from meshserve.engine.step_time import StepShape
from meshserve.errors import InvalidArgumentError
from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.pipeline import StagePipeline, load_host_costs
from meshserve.simulator.step_cost import StepCost
from meshserve.simulator.trace import SimRequest, poisson_trace

C = 0.01  # seconds per stage, the unit of the closed forms below
DECODE = StepShape(4, 4, 400)


def _const(seconds: float):
    return lambda shape: seconds


def _pp(pp: int = 2, depth: int = 0, host_s: float = 0.0, trip_s: float = 0.0, **kw) -> SimConfig:
    return SimConfig(gpu="H200", num_gpus=pp, pp=pp, pipeline_depth=depth, pp_host_step_s=host_s,
                     pp_round_trip_s=trip_s, num_blocks=4096, **kw)


def _duration(config: SimConfig, num_seqs: int, output_len: int, stage_costs) -> float:
    trace = [SimRequest(0.0, 64, output_len) for _ in range(num_seqs)]
    report = simulate(config, trace, step_cost=stage_costs)
    assert report["completed"] == num_seqs
    return report["duration_s"]


def _per_token(config: SimConfig, num_seqs: int, stage_costs, more: int = 1) -> float:
    """Seconds one more output token per sequence adds to the run: the steady state's cycle (averaged over `more`
    tokens, for a cycle of steps that is not one token long)."""
    return (_duration(config, num_seqs, 40 + more, stage_costs) - _duration(config, num_seqs, 40, stage_costs)) / more


# -- the stages alone -----------------------------------------------------------------------------------------
def test_stages_in_series_one_step_at_a_time():
    """Steps entering together: the first pays every stage, then one leaves per (slowest) stage time."""
    equal = StagePipeline([_const(C)] * 3, lambda tokens: 0.0)
    assert [equal.run(0.0, DECODE) for _ in range(4)] == pytest.approx([3 * C, 4 * C, 5 * C, 6 * C])
    assert equal.busy_s == pytest.approx([4 * C] * 3)
    slow_last = StagePipeline([_const(C), _const(3 * C)], lambda tokens: 0.0)
    assert [slow_last.run(0.0, DECODE) for _ in range(3)] == pytest.approx([4 * C, 7 * C, 10 * C])


def test_stage_hop_and_bubble():
    """The hop adds to every stage boundary; a lone step leaves the last stage idle while the others work."""
    p = StagePipeline([_const(C)] * 2, lambda tokens: 0.5 * C)
    assert p.run(0.0, DECODE) == pytest.approx(2.5 * C)
    assert p.bubble == pytest.approx(1 - 1 / 2.5)  # busy C of the 2.5 C from its launch to its end


# -- the engine's pipelined loop on the simulated clock -------------------------------------------------------
def test_one_sequence_pays_every_stage():
    """A sequence has at most one step in flight: alone, each of its tokens costs the sum of the stages."""
    assert _per_token(_pp(pp=2), 1, _const(C)) == pytest.approx(2 * C)
    assert _per_token(_pp(pp=3, depth=4), 1, _const(C)) == pytest.approx(3 * C)
    # the whole run: O steps, every one through both stages
    assert _duration(_pp(pp=2), 1, 40, [_const(C), _const(2 * C)]) == pytest.approx(40 * 3 * C)


def test_steps_in_flight_equal_to_stages_keep_every_stage_busy():
    """depth = pp stages and pp sequences (one per step in flight): one step leaves per stage time, so every
    sequence's token costs pp stage times and the replica makes pp tokens per pp stage times."""
    for pp in (2, 3):
        assert _per_token(_pp(pp=pp), pp, _const(C)) == pytest.approx(pp * C)
        # more sequences than steps: each step takes its share (ceil(running / depth)), the cycle is the same
        assert _per_token(_pp(pp=pp), 4 * pp, _const(C)) == pytest.approx(pp * C)


def test_fewer_steps_in_flight_than_stages_leave_bubbles():
    """Two sequences over three stages: two steps in flight, each token still passes three stages (3 C per token
    for both), so a stage idles a third of the time."""
    assert _per_token(_pp(pp=3), 2, _const(C)) == pytest.approx(3 * C)
    trace = [SimRequest(0.0, 64, 400) for _ in range(2)]
    report = simulate(_pp(pp=3), trace, step_cost=_const(C))
    assert report["pipeline"]["bubble"] == pytest.approx(1 / 3, abs=0.01)
    assert report["pipeline"]["stage_busy_fraction"] == pytest.approx([2 / 3] * 3, abs=0.01)


def test_the_slowest_stage_bounds_throughput():
    """Stages of C and 3 C with two steps in flight: one step leaves per 3 C (the slow stage is never idle); one
    sequence alone pays both (4 C)."""
    costs = [_const(C), _const(3 * C)]
    assert _per_token(_pp(pp=2), 2, costs) == pytest.approx(2 * 3 * C)
    assert _per_token(_pp(pp=2), 1, costs) == pytest.approx(4 * C)
    trace = [SimRequest(0.0, 64, 400) for _ in range(2)]
    busy = simulate(_pp(pp=2), trace, step_cost=costs)["pipeline"]["stage_busy_fraction"]
    assert busy[1] == pytest.approx(1.0, abs=0.01) and busy[0] == pytest.approx(1 / 3, abs=0.01)


def test_host_cost_bounds_throughput_when_it_is_the_slowest():
    """The host spends h on every step before it enters the first stage: with h = 2 C and three steps in flight
    over two C stages, the host sets the pace (3 h per token of each of three sequences). With two steps in
    flight and h = 1.5 C the latency loop does: a step's two stages (the other step's host work overlaps them),
    then its own host work again: 2 C + h per token, more than the host's 2 h."""
    h = 2 * C
    assert _per_token(_pp(pp=2, depth=3, host_s=h), 3, _const(C)) == pytest.approx(3 * h)
    h = 1.5 * C
    assert _per_token(_pp(pp=2, depth=2, host_s=h), 2, _const(C)) == pytest.approx(2 * C + h)
    # a host faster than a stage: with one step in flight per stage it still sits on every step's loop; one more
    # step in flight hides it (the engine's reason for --pipeline-depth pp + 1): one step per stage time again
    h = 0.5 * C
    assert _per_token(_pp(pp=2, depth=2, host_s=h), 2, _const(C)) == pytest.approx(2 * C + h)
    assert _per_token(_pp(pp=2, depth=3, host_s=h), 3, _const(C)) == pytest.approx(3 * C)


def test_round_trip_delays_steps_without_keeping_the_host_busy():
    """The round trip r beyond the host's own time h sits on each sequence's cycle (h + r + both stages) but not
    on the host: with h = 0.5 C, r = 3 C and three steps in flight the cycle is 5.5 C per token, not 3 h."""
    h, r = 0.5 * C, 3 * C
    assert _per_token(_pp(pp=2, depth=3, host_s=h, trip_s=r), 3, _const(C)) == pytest.approx(h + r + 2 * C)
    # with the host's time alone the host binds when it is the slowest (3 h per token at depth 3)
    assert _per_token(_pp(pp=2, depth=3, host_s=2 * C), 3, _const(C)) == pytest.approx(3 * 2 * C)


def test_token_handoff_takes_the_round_trip_off_the_sequences_cycle():
    """With the hand-off a sequence runs again pp steps after its last: 4 sequences in 2 groups (each step takes
    ceil(running / pp), whatever the depth), a token per sequence every 2 steps. At depth pp + 1 the host's loop
    (read back the oldest, launch the next: h + r + 2 C per 3 steps; a sequence read back runs in the next step
    too, beside the handed-off ones, as the engine's scheduler takes it) paces it: (h + r + 2 C) x 2/3 per token
    against h + r + 2 C without the hand-off. At depth pp the host must read a step back before launching the one
    that needs its tokens, so the hand-off gains nothing."""
    h, r = 0.5 * C, 3 * C
    cycle = h + r + 2 * C
    off = _per_token(_pp(pp=2, depth=3, host_s=h, trip_s=r), 4, _const(C))
    # the host's loop runs 3 steps per h + r + 2 C, 1.5 tokens: averaged over 60 tokens (40 loops)
    on = _per_token(_pp(pp=2, depth=3, host_s=h, trip_s=r, pp_token_handoff=True), 4, _const(C), more=60)
    assert off == pytest.approx(cycle)
    assert on == pytest.approx(cycle * 2 / 3)
    assert _per_token(_pp(pp=2, depth=2, host_s=h, trip_s=r, pp_token_handoff=True), 4, _const(C)) == \
        pytest.approx(cycle)
    # a free host: the stages bound it either way (2 steps of C per token on each stage)
    assert _per_token(_pp(pp=2, depth=3, pp_token_handoff=True), 4, _const(C)) == pytest.approx(2 * C)
    # the steps hold half the running sequences (2 groups), not a third: W2 with the hand-off runs ~2 steps per
    # token per sequence where depth 3 without it runs ~3
    trace = [SimRequest(0.0, 64, 40) for _ in range(6)]
    steps_on = simulate(_pp(pp=2, depth=3, pp_token_handoff=True), trace, step_cost=_const(C))["steps"]
    steps_off = simulate(_pp(pp=2, depth=3), trace, step_cost=_const(C))["steps"]
    assert steps_on == pytest.approx(2 * 40, abs=2) and steps_off == pytest.approx(3 * 40, abs=2)


def test_handoff_step_waits_on_the_device_for_the_ids_it_reads():
    """Stage 0 starts a step no earlier than inputs_s (the last stage's ids of step n - pp, handed over)."""
    p = StagePipeline([_const(C)] * 2, lambda tokens: 0.0)
    assert p.run(0.0, DECODE, inputs_s=5 * C) == pytest.approx(7 * C)
    assert p.run(0.0, DECODE) == pytest.approx(8 * C)  # after the previous step on stage 0 (free at 6 C)


def test_handoff_and_partition_are_checked_as_the_engine_checks_them():
    with pytest.raises(InvalidArgumentError, match="pp-token-handoff"):
        SimConfig(num_gpus=2, tp=2, pp_token_handoff=True).validate()
    with pytest.raises(InvalidArgumentError, match="pp-token-handoff"):
        SimConfig(num_gpus=4, tp=2, pp=2, pp_token_handoff=True).validate()
    with pytest.raises(InvalidArgumentError, match="pp-layer-partition"):
        SimConfig(num_gpus=2, pp=2, pp_layer_partition=(17, 16)).validate()  # 33 of the 8B's 32 layers
    with pytest.raises(InvalidArgumentError, match="pp-layer-partition"):
        SimConfig(num_gpus=2, pp=2, pp_layer_partition=(32,)).validate()
    SimConfig(num_gpus=2, pp=2, pp_layer_partition=(17, 15), pp_token_handoff=True).validate()


def test_depth_below_stages_is_refused():
    with pytest.raises(InvalidArgumentError, match="pipeline-depth"):
        simulate(_pp(pp=3, depth=2), [SimRequest(0.0, 64, 4)], step_cost=_const(C))
    with pytest.raises(InvalidArgumentError, match="multiple"):
        SimConfig(num_gpus=3, pp=2).validate()


# -- calibrated stage costs --------------------------------------------------------------------------------------
def test_stage_costs_split_the_model():
    """Two stages' decode times add up to the whole model's plus one more fixed cost per step (each stage launches
    its own); a prompt-carrying step splits its mixed-step cost by layers."""
    config = SimConfig(gpu="H200")
    model, gpu = config.model_spec(), config.gpu_spec()
    whole = StepCost(model, gpu)
    s0, s1 = (StepCost(model, gpu, pp=2, stage=s) for s in (0, 1))
    assert s0(DECODE) + s1(DECODE) == pytest.approx(whole(DECODE) + whole.weights.constant_ms * 1e-3)
    assert s0.weights.mixed_ms + s1.weights.mixed_ms == pytest.approx(whole.weights.mixed_ms)
    assert StepCost(model, gpu, pp=1).weights == whole.weights


def test_the_embedding_is_a_gather_so_the_last_stage_is_the_heavier():
    """The first stage's embedding is not read whole (a gather of the step's rows) while the last stage reads the
    whole head: at an even split the last stage is the slower; 17,15 (the engine's --pp-layer-partition that
    measured faster) brings the two within a layer's weights of each other. Either way the stages' weight reads
    sum to the TP=1 fit's (its factor priced every byte)."""
    config = SimConfig(gpu="H200")
    model, gpu = config.model_spec(), config.gpu_spec()
    whole = StepCost(model, gpu)
    even = [StepCost(model, gpu, pp=2, stage=s) for s in (0, 1)]
    part = [StepCost(model, gpu, pp=2, stage=s, layer_partition=(17, 15)) for s in (0, 1)]
    for s0, s1 in (even, part):
        assert s0.model.weight_bytes + s1.model.weight_bytes == pytest.approx(whole.model.weight_bytes)
    assert even[1](DECODE) > 1.1 * even[0](DECODE)
    assert abs(part[0](DECODE) - part[1](DECODE)) < 0.5 * (even[1](DECODE) - even[0](DECODE))
    assert part[0](DECODE) > even[0](DECODE) and part[1](DECODE) < even[1](DECODE)
    assert part[0].model.kv_bytes_per_token == pytest.approx(whole.model.kv_bytes_per_token * 17 / 32)


def test_calibrated_pipeline_run_is_deterministic_and_keeps_the_engine_cap():
    trace = poisson_trace(20.0, 5.0, seed=4, input_len=256, output_len=64)
    config = SimConfig(gpu="H200", num_gpus=4, pp=2, max_num_seqs=8, seed=4)
    a, b = simulate(config, trace), simulate(config, trace)
    for r in (a, b):
        r.pop("sim_wall_s")
    assert a == b and a["completed"] == len(trace) and a["replicas"] == 2
    assert a["pipeline"]["host_step_s"] == load_host_costs().step_s > 0
    assert a["pipeline"]["round_trip_s"] == load_host_costs().round_trip_s > 0
    assert a["replica_model"] == "scheduler"
    fast = simulate(SimConfig(gpu="H200", num_gpus=4, pp=2, max_num_seqs=8, replica_model="fast"), trace)
    assert fast["replica_model"] == "scheduler" and "pipeline" in fast["replica_model_fallback"]


def test_pipeline_stages_hold_more_kv():
    """Each stage holds half the layers: two stages leave about twice one GPU's KV blocks (W2: 119,052 measured
    against 55,776 for TP=1)."""
    one = SimConfig(gpu="H200", max_model_len=4096)
    two = SimConfig(gpu="H200", num_gpus=2, pp=2, max_model_len=4096)
    model, gpu = one.model_spec(), one.gpu_spec()
    assert two.kv_blocks(model, gpu) / one.kv_blocks(model, gpu) == pytest.approx(119052 / 55776, rel=0.02)


def test_light_bookkeeping_matches_the_engines_sequences_with_stages():
    """Sequences as counts (light.py) give the report the engine's own Sequence and BlockManager give, with the
    scheduler in the pipelined mode (async, skip_pending) and preemption (a small KV pool)."""
    trace = poisson_trace(30.0, 4.0, seed=2, input_len=300, output_len=48)
    config = SimConfig(gpu="H200", num_gpus=2, pp=2, pipeline_depth=3, max_num_seqs=16, num_blocks=300)
    light, full = simulate(config, trace), simulate(config, trace, fast_forward=False)
    for r in (light, full):
        r.pop("sim_wall_s")
    assert light == full
    assert light["completed"] == len(trace) and light["preemptions"] > 0
