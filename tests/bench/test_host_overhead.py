"""`meshserve bench host` runs the real engine step with the model removed and reports its parts."""

import argparse

from meshserve.bench.host_overhead import run_host_overhead


def test_host_overhead_reports_consistent_parts():
    res = run_host_overhead(argparse.Namespace(batch=8, prompt_len=32, steps=5))
    assert res["batch"] == 8 and res["step_ms"] > 0
    assert abs(res["prepare_ms"] + res["schedule_update_output_ms"] - res["step_ms"]) < 1e-6
