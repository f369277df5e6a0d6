"""`meshserve bench frontend --through-router`: the router's CPU per request and per event, from a real run."""

from __future__ import annotations

import argparse

import pytest

from meshserve.bench.frontend import run_frontend


@pytest.mark.slow
def test_through_router_reports_the_routers_cpu_and_sends():
    ns = argparse.Namespace(step_ms=20.0, max_num_seqs=64, max_queue_len=1 << 20, concurrency=4, client_procs=1,
                            duration=3.0, ramp_s=0.2, max_tokens=8, prompt_len=8, through_router=True,
                            router_pythonpath=None)
    row = run_frontend(ns, 1)
    assert row["client errors"] == 0 and row["rejected"] == 0 and row["requests"] > 10
    assert row["tokens"] == 8 * row["requests"]
    # every token's event, plus the chunks that carry no token (usage, [DONE]): one send each at this load
    assert row["events"] <= row["chunks"] <= row["events"] + 3 * row["requests"]
    assert 0 < row["router CPU s"] and 0 < row["router CPU us/event"] < 5000
