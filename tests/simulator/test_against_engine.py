"""The simulator against a real CPU run of the engine on a tiny model.

Both drive the same Scheduler class with the same settings, so the sequence of step shapes (tokens, sequences,
KV context) must be identical, preemptions included. Durations: step costs fitted on every other step of the
run predict the run's makespan within the bound below. (Fitted on another run they were within 3-14% on an idle
machine, but a shared CI machine's load changes between runs by 2-5x, so the fit comes from the same run.)
"""

from __future__ import annotations

import random

from meshserve.config import EngineArgs
from meshserve.engine.messages import EngineCoreRequest
from meshserve.engine.step_time import DeviceRates, StepShape, StepTimeModel
from meshserve.sampling import SamplingParams
from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.step_cost import fit_step_weights, read_step_trace
from meshserve.simulator.trace import SimRequest

BUDGET, MAX_SEQS, BLOCKS = 64, 6, 40  # small: chunked prefill, a capped batch and KV pressure all happen
MAKESPAN_BOUND = 0.3  # |simulated - measured| / measured, with step costs fitted on half of the steps


def _lengths(seed: int, n: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(10, 150), rng.randint(4, 60)) for _ in range(n)]


def _real_run(model_dir: str, lengths: list[tuple[int, int]], trace_path) -> tuple[list[dict], object]:
    from meshserve.engine.core import EngineCore

    args = EngineArgs(model=model_dir, device="cpu", async_scheduling=False, enable_prefix_caching=False,
                      max_num_batched_tokens=BUDGET, max_num_seqs=MAX_SEQS, num_gpu_blocks_override=BLOCKS,
                      max_model_len=256, step_trace=str(trace_path))
    core = EngineCore.from_engine_args(args)
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    for i, (p, o) in enumerate(lengths):
        core.add_request(EngineCoreRequest(str(i), [(7 * i + j) % 100 + 3 for j in range(p)], params, o))
    while core.has_unfinished_requests():
        core.step()
    preemptions = core.scheduler.num_preemptions
    core.shutdown()
    return read_step_trace(trace_path), (core, preemptions)


def _sim(lengths, step_cost) -> dict:
    config = SimConfig(gpu="H200", num_blocks=BLOCKS, max_num_batched_tokens=BUDGET, max_num_seqs=MAX_SEQS,
                       max_model_len=256, enable_prefix_caching=False)
    return simulate(config, [SimRequest(0.0, p, o) for p, o in lengths], step_cost=step_cost)


def test_same_steps_and_close_time_as_a_real_cpu_engine(tiny_model_dir, tmp_path):
    lengths = _lengths(2, 14)
    rows, (core, real_preemptions) = _real_run(tiny_model_dir("llama"), lengths, tmp_path / "steps.jsonl")

    # 1. the same schedule, step by step
    shapes: list[StepShape] = []
    report = _sim(lengths, lambda shape: shapes.append(shape) or 1e-3)
    assert [(s.num_tokens, s.num_seqs, s.context_tokens) for s in shapes] == \
        [(r["tokens"], r["seqs"], r["context"]) for r in rows]
    assert report["preemptions"] == real_preemptions > 0
    assert report["completed"] == len(lengths)

    # 2. durations: weights fitted on every other step, on the CPU's step-time features
    model = core.step_model
    rates = DeviceRates(model.rates.bandwidth, model.rates.flops)
    weights, _ = fit_step_weights(rows[::2], model.weight_bytes, model.kv_bytes_per_token, rates)
    predictor = StepTimeModel(model.weight_bytes, model.kv_bytes_per_token, rates)
    predictor._theta = weights.as_tuple()
    report = _sim(lengths, predictor.predict)
    measured = sum(r["actual_s"] for r in rows)
    print(f"steps {len(rows)}, preemptions {real_preemptions}, makespan simulated {report['duration_s']:.4f} s vs "
          f"measured {measured:.4f} s")
    assert abs(report["duration_s"] - measured) / measured < MAKESPAN_BOUND
