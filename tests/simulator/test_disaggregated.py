"""Prefill/decode disaggregation in the simulator (disaggregated.py): closed-form cases and its reference path."""

from __future__ import annotations

import json
import math

import pytest

from meshserve.cli import main
from meshserve.engine.step_time import StepShape
from meshserve.errors import InvalidArgumentError
from meshserve.planner.memory import kv_bytes_per_token
from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.trace import SimRequest, poisson_trace, shared_prefix_trace

PREFILL_S, DECODE_S = 0.05, 0.01


def _cost(shape: StepShape) -> float:
    """A step with any prompt token costs PREFILL_S, a step of decodes only DECODE_S (whatever the batch)."""
    return DECODE_S if shape.num_tokens == shape.num_seqs else PREFILL_S


def _config(**kw) -> SimConfig:
    base = dict(gpu="H200", num_gpus=2, num_blocks=4096, kv_link_gb_s=math.inf, kv_transfer_latency_s=0.0)
    return SimConfig(**{**base, **kw})


def _staggered(n: int = 10, out: int = 100) -> list[SimRequest]:
    return [SimRequest(0.1 * k, 1000, out) for k in range(n)]


def test_instant_link_ttft_is_the_prefill_alone():
    """An infinitely fast link with room everywhere: each request's first token is out when its prefill is, so
    TTFT is what one replica serving the prompts alone (1-token requests) gives."""
    trace = _staggered()
    disagg = simulate(_config(disaggregation=(1, 1)), trace, step_cost=_cost)
    prefill_only = simulate(_config(num_gpus=1), [SimRequest(r.arrival_s, r.prompt_len, 1) for r in trace],
                            step_cost=_cost)
    assert disagg["completed"] == len(trace)
    for q in ("ttft_mean", "ttft_p50", "ttft_p99"):
        assert disagg[q] == pytest.approx(prefill_only[q], abs=1e-12)
    assert disagg["ttft_p99"] == pytest.approx(PREFILL_S)  # nobody waits for a prefill here


def test_decode_replicas_run_no_prompt_steps():
    """Prompts arriving while others decode: colocated, their 50 ms prefill steps stall the decodes; on a decode
    replica every gap is one 10 ms decode step, but a sequence's first (from its hand-off to the end of the step
    after it, < 2 steps)."""
    trace = _staggered()
    disagg = simulate(_config(disaggregation=(1, 1)), trace, step_cost=_cost)
    colocated = simulate(_config(), trace, step_cost=_cost)
    assert disagg["itl_p50"] == pytest.approx(DECODE_S, abs=1e-4)  # the histogram's 0.1 ms bins
    assert disagg["tpot_p99"] <= (2 * DECODE_S + 98 * DECODE_S) / 99 + 1e-12
    assert disagg["tpot_p50"] >= DECODE_S - 1e-12
    assert disagg["itl_p99"] <= 2 * DECODE_S
    assert colocated["itl_p99"] == pytest.approx(PREFILL_S, abs=1e-4)  # decodes inside prompt steps
    assert colocated["tpot_p99"] > disagg["tpot_p99"]
    assert disagg["disaggregation"]["decode_busy_fraction"] > 0


def test_transfer_adds_bytes_over_bandwidth_plus_latency():
    """One request: TTFT = its prefill + prompt x KV bytes per token / bandwidth + the fixed latency."""
    one = [SimRequest(0.0, 1000, 10)]
    instant = simulate(_config(disaggregation=(1, 1)), one, step_cost=_cost)
    gb_s, latency = 2.0, 0.003
    linked = simulate(_config(disaggregation=(1, 1), kv_link_gb_s=gb_s, kv_transfer_latency_s=latency), one,
                      step_cost=_cost)
    size = 1000 * kv_bytes_per_token(SimConfig().model_spec())
    assert linked["disaggregation"]["transfer_bytes"] == size
    assert linked["ttft_p50"] == pytest.approx(instant["ttft_p50"] + size / (gb_s * 1e9) + latency, abs=1e-12)
    assert linked["tpot_p50"] == pytest.approx(instant["tpot_p50"], abs=1e-12)
    assert linked["disaggregation"]["transfer_s"]["p50"] == pytest.approx(size / (gb_s * 1e9) + latency)
    fp8 = simulate(_config(disaggregation=(1, 1), kv_link_gb_s=gb_s, kv_transfer_latency_s=latency, kv_dtype="fp8"),
                   one, step_cost=_cost)  # an fp8 cache sends half the bytes
    assert fp8["disaggregation"]["transfer_bytes"] == size // 2


def test_decode_without_room_queues_the_hand_off():
    """Decode room for one sequence at a time: hand-offs wait in its queue, every request still completes, and
    the fast path (decode runs, light sequences) matches the step-by-step reference."""
    trace = [SimRequest(0.01 * k, 200, 50) for k in range(6)]
    config = _config(disaggregation=(1, 1), num_blocks=20)
    fast = simulate(config, trace, step_cost=_cost)
    ref = simulate(config, trace, step_cost=_cost, fast_forward=False)
    assert fast["completed"] == len(trace)
    assert fast["disaggregation"]["handoff_wait_s"]["p99"] > 0.3  # 6 decodes of ~0.5 s in series
    for k in ("ttft_p50", "ttft_p99", "tpot_p50", "e2e_p99", "steps"):
        assert fast[k] == pytest.approx(ref[k], abs=1e-12), k


def test_deterministic_for_a_seed():
    """Calibrated steps, shared prefixes (prefix hits on the prefill replicas), prefix-affine routing."""
    trace = shared_prefix_trace(poisson_trace(20.0, 2.0, seed=3, input_len=512, output_len=32), 4, 256, seed=3)
    config = SimConfig(gpu="H200", num_gpus=3, disaggregation=(2, 1), router="prefix-affinity", seed=3,
                       num_blocks=2048)
    a, b = simulate(config, trace), simulate(config, trace)
    a.pop("sim_wall_s"), b.pop("sim_wall_s")
    assert a == b
    assert a["completed"] == len(trace) and a["prefix_cache_hit_rate"] > 0
    assert a["disaggregation"]["transfers"] == len(trace)


@pytest.mark.parametrize("split", [(0, 2), (2, 0), (1, 2)])
def test_empty_pool_is_refused(split):
    with pytest.raises(InvalidArgumentError, match="P >= 1 prefill and D >= 1 decode"):
        SimConfig(num_gpus=2, disaggregation=split).validate()


def test_cli_empty_pool_is_one_line(capsys):
    assert main(["simulate", "--num-gpus", "2", "--disaggregation", "2:0", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--disaggregation 2:0" in err


def test_config_file_keys(capsys, tmp_path):
    """The flags as config-file keys: P:D as a string, the link's GB/s and latency."""
    cfg = tmp_path / "sim.toml"
    cfg.write_text('disaggregation = "1:1"\nkv-link-gb-s = 100\nkv-transfer-latency-us = 50\n')
    assert main(["simulate", "--config", str(cfg), "--gpu", "H200", "--num-gpus", "2", "--qps", "4", "--duration",
                 "1", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    section = report["disaggregation"]
    assert (section["prefill_replicas"], section["decode_replicas"]) == (1, 1)
    assert section["kv_link_gb_s"] == 100 and section["transfer_latency_s"] == pytest.approx(50e-6)
    assert section["transfers"] == report["completed"] > 0
