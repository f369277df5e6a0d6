"""Arrival traces: rates, W3's exact arrivals, files, token ids."""

from __future__ import annotations

import itertools
import json

import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.simulator.trace import (
    SimRequest,
    bursty_trace,
    file_trace,
    mean_rate,
    poisson_trace,
    prompt_token_ids,
    shared_prefix_trace,
    w3_trace,
)


def test_poisson_rate_and_lengths():
    trace = poisson_trace(50.0, 200.0, seed=2)
    assert mean_rate(trace) == pytest.approx(50.0, rel=0.03)
    assert all(r.prompt_len == 512 and r.output_len == 128 for r in trace)
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(trace))


def test_bursty_keeps_the_mean_and_bursts():
    trace = bursty_trace(40.0, 300.0, seed=2, burst_factor=5.0, period_s=30.0, duty=0.2)
    assert mean_rate(trace) == pytest.approx(40.0, rel=0.05)
    in_burst = sum(1 for r in trace if r.arrival_s % 30.0 < 6.0)
    # 20% of the time at 5x the rate of the rest: 5 x 0.2 / (5 x 0.2 + 0.8) = 56% of the requests
    assert in_burst / len(trace) == pytest.approx(0.556, abs=0.03)


def test_w3_trace_is_the_benchmarks_arrivals():
    from meshserve.bench.serve_bench import w3_requests

    sim = w3_trace(32.0)
    bench = w3_requests(32.0, None, 512, 128, seed=1032)
    assert len(sim) == len(bench) == 960
    assert [r.arrival_s for r in sim] == [r.send_at for r in bench]


def test_file_trace(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"timestamp": 105.0, "prompt_tokens": 10, "output_tokens": 3},
        {"arrival_s": 100.5, "prompt_len": 20, "output_len": 4, "prefix_group": 2, "prefix_len": 16}]) + "\n")
    assert file_trace(p) == [SimRequest(0.0, 20, 4, 2, 16), SimRequest(4.5, 10, 3)]
    (tmp_path / "bad.jsonl").write_text('{"arrival_s": 1}\n')
    with pytest.raises(InvalidArgumentError):
        file_trace(tmp_path / "bad.jsonl")


def test_token_ids_share_only_declared_prefixes():
    reqs = shared_prefix_trace(poisson_trace(100.0, 1.0, 0), num_groups=2, prefix_len=32, seed=0)
    ids = [prompt_token_ids(i, r) for i, r in enumerate(reqs)]
    assert all(len(x) == r.prompt_len for x, r in zip(ids, reqs))
    same = [i for i, r in enumerate(reqs) if r.prefix_group == reqs[0].prefix_group]
    assert all(ids[i][:32] == ids[0][:32] for i in same)
    firsts = {tuple(x[32:48]) for x in ids}  # the first block after the prefix: everyone's own
    assert len(firsts) == len(ids)
    plain = [prompt_token_ids(i, SimRequest(0.0, 16, 1)) for i in range(100_000)]
    assert len({tuple(x) for x in plain}) == 100_000
