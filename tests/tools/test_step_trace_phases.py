"""tools/step_trace_phases.py on a small synthetic step trace with a known answer."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "step_trace_phases", Path(__file__).parents[2] / "tools" / "step_trace_phases.py")
step_trace_phases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_trace_phases)


def _step(t, seqs, actual_ms, wait_ms, masked=0):
    return {"t": t, "seqs": seqs, "actual_s": actual_ms / 1e3, "wait_s": wait_ms / 1e3, "masked_rows": masked}


def test_phases_split_by_time_and_batch_and_tell_host_bound_steps():
    # "free": 64 rows every 5 ms, the host waits 2 ms each time (device-bound); "schema": every 7 ms with 5 ms of
    # device time and no wait (host-bound); a batch-1 step inside "schema" goes to its own class
    steps = [_step(0.000 + 0.005 * i, 64, 5.0, 2.0) for i in range(5)]
    steps += [_step(1.000 + 0.007 * i, 64, 5.0, 0.0, masked=64) for i in range(5)]
    steps.append(_step(1.100, 1, 4.0, 3.0, masked=1))
    rows = step_trace_phases.summarize(steps, [("free", 0.0, 0.5), ("schema", 0.9, 1.2)])
    by = {(r["phase"], r["batch"]): r for r in rows}
    free, schema, one = by[("free", "48+")], by[("schema", "48+")], by[("schema", "1")]
    assert free["steps"] == 4  # the first step of a phase has no period
    assert abs(free["period_ms"] - 5.0) < 1e-6 and free["wait_ms"] == 2.0 and free["host_bound_share"] == 0
    assert free["masked_share"] == 0
    assert schema["steps"] == 4 and abs(schema["period_ms"] - 7.0) < 1e-6 and schema["device_ms"] == 5.0
    assert schema["host_bound_share"] == 1 and schema["masked_share"] == 1
    assert one["steps"] == 1 and one["seqs_mean"] == 1
