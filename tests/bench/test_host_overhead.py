"""`meshserve bench host` runs the real engine step with the model removed and reports its parts."""

import argparse

import pytest

from meshserve.bench.host_overhead import (
    COMPONENTS,
    SteadyArrivals,
    build_engine,
    build_steady_engine,
    run_host_overhead,
)
from meshserve.cli import main


def _ns(**kw):
    base = {"batch": 8, "prompt_len": 32, "steps": 5, "warmup": 1, "async_scheduling": False, "slo_ttft_ms": None,
            "slo_tpot_ms": None, "kv_offload_gib": None, "spec_ngram": None, "waiting": None, "max_tokens": None,
            "slo_prefill_chunk": None}
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


def _steady(**kw):
    return _ns(**{"batch": 32, "prompt_len": 32, "steps": 12, "waiting": 6, "max_tokens": 8, "async_scheduling": True,
                  "slo_ttft_ms": 1000.0, "slo_tpot_ms": 50.0, "slo_prefill_chunk": 64, **kw})


def test_steady_mode_admits_and_finishes_in_every_step():
    """--waiting: the queue stays full, and every measured step admits the prompts its prefill cap holds (64
    tokens: two 32-token prompts) while as many requests finish; each step computes those prompt tokens beside
    the decodes of the running batch."""
    ns = _steady()
    engine = build_steady_engine(ns)
    arrivals = SteadyArrivals(engine, ns)
    scheduled, finished = [], []
    schedule = engine.core.scheduler.schedule
    engine.core.scheduler.schedule = lambda: scheduled.append(schedule()) or scheduled[-1]
    for _ in range(40):
        arrivals.top_up()
        assert engine.core.scheduler.num_waiting == ns.waiting
        finished.append(sum(o.finished for o in engine.step()))
        arrivals.tick()
    last = scheduled[-10:]
    prompt_tokens = [sum(e.num_new_tokens for e in out.scheduled if e.num_computed_tokens < ns.prompt_len)
                     for out in last]
    assert prompt_tokens == [ns.slo_prefill_chunk] * 10
    assert all(sum(e.num_new_tokens == 1 for e in out.scheduled) > 8 for out in last)  # decodes beside them
    assert finished[-10:] == [ns.slo_prefill_chunk // ns.prompt_len] * 10
    res = run_host_overhead(ns)
    assert res["mean_waiting"] == ns.waiting and res["shed"] == 0
    assert res["admitted_per_step"] == res["finished_per_step"] == ns.slo_prefill_chunk // ns.prompt_len
    assert 0 < res["core_cpu_ms"] < res["step_cpu_ms"]  # the front end's part is left out


def test_steady_mode_without_targets_fills_the_batch():
    """No targets: admissions are bounded by the running batch (--batch): a finished request's place is taken
    by an admission (the batch turns over in bursts here, its requests all the same length)."""
    ns = _steady(batch=8, slo_ttft_ms=None, slo_tpot_ms=None, slo_prefill_chunk=None)
    res = run_host_overhead(ns)
    assert res["admitted_per_step"] > 0 and res["finished_per_step"] > 0
    assert abs(res["admitted_per_step"] - res["finished_per_step"]) * ns.steps <= ns.batch
    assert 6 <= res["mean_running"] <= 8


@pytest.mark.parametrize("argv,message", [
    (["--waiting", "0"], "argument --waiting: must be >= 1, got 0"),
    (["--waiting", "4", "--max-tokens", "0"], "argument --max-tokens: must be >= 1, got 0"),
    (["--waiting", "4", "--slo-prefill-chunk", "x"], "argument --slo-prefill-chunk: expected a whole number"),
    (["--max-tokens", "8"], "--max-tokens needs --waiting"),
    (["--slo-prefill-chunk", "512"], "--slo-prefill-chunk needs --waiting"),
])
def test_steady_mode_bad_flags_are_one_usage_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "host", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("meshserve bench host: error:")
