"""Same seed, same report; another seed, another report; router policies behave as their names say."""

from __future__ import annotations

import pytest

from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.trace import poisson_trace, shared_prefix_trace


def _run(seed: int, router: str = "least-outstanding", **kw) -> dict:
    trace = shared_prefix_trace(poisson_trace(40.0, 10.0, seed), num_groups=6, prefix_len=256, seed=seed)
    report = simulate(SimConfig(gpu="H100-SXM", num_gpus=3, router=router, **kw), trace)
    report.pop("sim_wall_s")
    return report


@pytest.mark.parametrize("router", ["least-outstanding", "round-robin", "prefix-affinity"])
def test_same_seed_same_report(router):
    assert _run(3, router) == _run(3, router)


def test_other_seed_other_report():
    a, b = _run(3), _run(4)
    assert a["num_requests"] != b["num_requests"] or a["ttft_mean"] != b["ttft_mean"]


def test_slo_run_is_deterministic_too():
    kw = {"slo_ttft_s": 1.0, "slo_tpot_s": 0.05}
    assert _run(5, **kw) == _run(5, **kw)


def test_prefix_affinity_keeps_prefixes_warm():
    """Twelve shared prefixes, three replicas with KV room for about four each: hashing each prefix to one
    replica keeps it cached there; spreading every prefix over every replica evicts them."""
    trace = shared_prefix_trace(poisson_trace(20.0, 20.0, 1, input_len=2048), num_groups=12, prefix_len=2000,
                                seed=1)
    kw = {"gpu": "H100-SXM", "num_gpus": 3, "num_blocks": 700}
    affine = simulate(SimConfig(router="prefix-affinity", **kw), trace)
    spread = simulate(SimConfig(router="round-robin", **kw), trace)
    assert affine["prefix_caching"] and spread["prefix_caching"]
    assert affine["prefix_cache_hit_rate"] > 0.8 > spread["prefix_cache_hit_rate"]
    assert affine["ttft_mean"] < spread["ttft_mean"]
