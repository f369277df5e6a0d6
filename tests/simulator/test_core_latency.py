"""SimConfig.core_latency_s: a fixed latency inside the server (the hop to the core, async scheduling's step),
which the server's TTFT clock counts and its 429s do not."""

from __future__ import annotations

import pytest

from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.frontend import FRONTEND_H200
from meshserve.simulator.trace import SimRequest, poisson_trace
from meshserve.simulator.validation import fixed_latency_at


def _config(**kw) -> SimConfig:
    return SimConfig(model="llama-3.1-8b", gpu="H200", max_model_len=4096, slo_ttft_s=1.0, slo_tpot_s=0.05,
                     frontend_request_s=FRONTEND_H200.per_request_s, frontend_token_s=FRONTEND_H200.per_token_s,
                     frontend_refusal_s=FRONTEND_H200.per_refusal_s, **kw)


def test_one_request_waits_the_hop_before_the_core():
    """Alone, a request's TTFT grows by the hop, wherever the latency sits."""
    trace = [SimRequest(0.0, 512, 8)]
    bare = simulate(_config(), trace)["ttft_p50"]
    assert simulate(_config(core_latency_s=0.02), trace)["ttft_p50"] == pytest.approx(bare + 0.02, abs=1e-9)
    assert simulate(_config(frontend_latency_s=0.02), trace)["ttft_p50"] == pytest.approx(bare + 0.02, abs=1e-9)


def test_refusals_do_not_wait_for_the_hop():
    """Past the knee the gate's 429s come back as fast as without a fixed latency; before the replica they would
    carry it."""
    trace = poisson_trace(128, 6.0, seed=1)
    bare = simulate(_config(), trace)["reject_latency_p50"]
    inside = simulate(_config(core_latency_s=0.017), trace)["reject_latency_p50"]
    before = simulate(_config(frontend_latency_s=0.017), trace)["reject_latency_p50"]
    assert inside < bare + 0.005
    assert before > bare + 0.015


def test_replays_without_stalls_put_the_fixed_latency_inside_the_server():
    assert fixed_latency_at(0.017, FRONTEND_H200, True) == {"frontend_latency_s": 0.0, "core_latency_s": 0.017}
    assert fixed_latency_at(0.017, FRONTEND_H200, False) == {"frontend_latency_s": 0.017, "core_latency_s": 0.0}


def test_the_fast_replica_model_leaves_it_to_the_scheduler():
    from meshserve.simulator.fast_fleet import fast_model_gap

    config = SimConfig(model="llama-3.1-8b", gpu="H200", core_latency_s=0.01)
    assert "core_latency_s" in fast_model_gap(config, False, False, False)
