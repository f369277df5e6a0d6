"""tools/step_floor.py on a synthetic step trace: each step lands in its kind, its floor is its bytes or its FLOPs
whichever is larger, and the GPU's busy share is its time over the trace's span."""

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("step_floor", Path(__file__).parents[2] / "tools" / "step_floor.py")
step_floor = importlib.util.module_from_spec(_spec)
sys.modules["step_floor"] = step_floor
_spec.loader.exec_module(step_floor)

WEIGHTS, KV_PER_TOKEN, PARAMS, HEAD = 1e9, 1e5, 5e8, 1e8
BANDWIDTH, FLOPS = 1e12, 1e15


def _row(t, tokens, seqs, context, actual_s):
    return {"t": t, "tokens": tokens, "seqs": seqs, "context": context, "actual_s": actual_s}


def test_each_step_is_floored_by_its_bytes_or_its_flops():
    rows = [
        _row(0.010, 8192, 4, 8192, 0.012),  # prefill: 2 x (5e8 x 8192 + 1e8 x 4) FLOPs -> 8.19 ms > bytes 1.82 ms
        _row(0.012, 256, 256, 256 * 500, 0.030),  # decode: bytes 1 GB + 12.8 GB of KV -> 13.8 ms > FLOPs 0.26 ms
        _row(0.043, 40, 40, 40 * 100, 0.002),  # decode 32-127: 1.4 ms of bytes
    ]
    table, busy = step_floor.floor_table(rows, WEIGHTS, KV_PER_TOKEN, lambda t, s: 2 * (PARAMS * t + HEAD * s),
                                         BANDWIDTH, FLOPS)
    assert list(table) == ["prefill (mixed)", "decode 256+", "decode 32-127"]
    n, gpu, floor, kv = table["prefill (mixed)"]
    assert (n, gpu) == (1, 0.012) and floor == pytest.approx(2 * (PARAMS * 8192 + HEAD * 4) / FLOPS)
    n, gpu, floor, kv = table["decode 256+"]
    assert kv == pytest.approx(256 * 500 * KV_PER_TOKEN / BANDWIDTH)
    assert floor == pytest.approx(WEIGHTS / BANDWIDTH + kv)
    assert table["decode 32-127"][2] == pytest.approx((WEIGHTS + 4000 * KV_PER_TOKEN) / BANDWIDTH)
    # the span runs from the first step's start (its t less its time) to the last step's t: 0.045 s
    assert busy == pytest.approx(0.044 / 0.045)
