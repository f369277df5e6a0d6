"""`meshserve bench host` runs the real engine step with the model removed and reports its parts."""

import argparse

import pytest

from meshserve.bench.host_overhead import COMPONENTS, build_engine, run_host_overhead


def _ns(**kw):
    base = {"batch": 8, "prompt_len": 32, "steps": 5, "warmup": 1, "async_scheduling": False, "slo_ttft_ms": None,
            "slo_tpot_ms": None, "kv_offload_gib": None, "spec_ngram": None}
    return argparse.Namespace(**{**base, **kw})


def test_host_overhead_reports_consistent_parts():
    res = run_host_overhead(_ns())
    assert res["batch"] == 8 and res["step_cpu_ms"] > 0
    # the whole batch decodes through every measured step, one token each
    assert res["mean_running"] == 8 and res["tokens_per_step"] == 8
    # medians of parts of each step: each part is timed, and none exceeds the largest step
    assert all(0 < res[f"{name}_ms"] <= res["step_cpu_mean_ms"] * res["steps"] for name in COMPONENTS)


@pytest.mark.parametrize("features", [
    {"async_scheduling": True},
    {"spec_ngram": 3},
    {"async_scheduling": True, "spec_ngram": 3, "kv_offload_gib": 0.01, "slo_ttft_ms": 1000.0, "slo_tpot_ms": 50.0},
])
def test_host_overhead_features_run_the_batch(features):
    res = run_host_overhead(_ns(**features))
    assert res["mean_running"] == 8
    if features.get("spec_ngram"):
        assert res["tokens_per_step"] > 8  # the fake model accepts the n-gram proposals of its own token
    else:
        assert res["tokens_per_step"] == 8


def test_removed_model_gives_its_token_to_every_sequence():
    """With speculation on, the verify rows accept the proposals of the fake's token: the outputs are exactly
    max_tokens of it, as without speculation."""
    engine = build_engine(_ns(batch=3, prompt_len=20, spec_ngram=2))
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    max_tokens = engine.core.config.scheduler_config.max_model_len - 28
    assert len(finished) == 3
    for out in finished:
        assert list(out.outputs[0].token_ids) == [17] * max_tokens
    assert engine.core.speculator.stats.num_accepted_tokens > 0
