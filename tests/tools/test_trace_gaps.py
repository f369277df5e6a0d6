"""tools/trace_gaps.py on a small synthetic torch.profiler trace with a known answer."""

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "trace_gaps", Path(__file__).parents[2] / "tools" / "trace_gaps.py"
)
trace_gaps = importlib.util.module_from_spec(_spec)
sys.modules["trace_gaps"] = trace_gaps  # dataclasses look their module up there
_spec.loader.exec_module(trace_gaps)


def _x(name, cat, ts, dur, corr=None):
    e = {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur}
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def _trace():
    return {
        "traceEvents": [
            # host: step 1 launches a graph; step 2's launch comes late, inside the scheduler's copy
            _x("step", "user_annotation", 0, 100),
            _x("cudaGraphLaunch", "cuda_runtime", 10, 5, corr=1),
            _x("EngineCore._schedule", "user_annotation", 120, 400),
            _x("aten::copy_", "cpu_op", 480, 30),
            _x("cudaGraphLaunch", "cuda_runtime", 500, 5, corr=2),
            _x("cudaLaunchKernel", "cuda_runtime", 506, 2, corr=3),
            # device: kernels of graph 1 (overlapping + touching), a 390 us gap, graph 2, then a 5 us gap
            _x("gemm_a", "kernel", 20, 50, corr=1),
            _x("gemm_b", "kernel", 60, 40, corr=1),
            _x("attn", "kernel", 100, 10, corr=1),
            _x("gemm_a", "kernel", 500, 50, corr=2),
            _x("sample", "kernel", 555, 10, corr=3),
            {"ph": "i", "name": "marker", "ts": 1},  # not a complete event: ignored
        ]
    }


def test_busy_intervals_merge_overlaps_and_touching():
    evs = [{"ts": 0, "dur": 10}, {"ts": 5, "dur": 10}, {"ts": 15, "dur": 5}, {"ts": 30, "dur": 1}]
    assert trace_gaps.busy_intervals(evs) == [(0, 20), (30, 31)]


def test_gaps_are_charged_to_the_late_launch_and_its_host_op():
    r = trace_gaps.analyse(_trace(), min_gap_us=20)
    assert r["span_us"] == 545 and r["busy_us"] == 90 + 50 + 10
    assert r["busy_frac"] == pytest.approx(150 / 545)
    assert r["graph_launches"] == 2
    (gap,) = r["gaps"]  # the 5 us gap before "sample" is under the threshold
    assert (gap.start_us, gap.dur_us) == (110, 390)
    assert (gap.launch, gap.host_op, gap.next_kernel) == ("cudaGraphLaunch", "aten::copy_", "gemm_a")
    assert r["gaps_by_cause"] == {"cudaGraphLaunch in aten::copy_": 390}
    assert r["kernels"]["gemm_a"] == 100


def test_small_threshold_sees_the_short_gap_and_main_prints(capsys, tmp_path):
    import json

    r = trace_gaps.analyse(_trace(), min_gap_us=1)
    assert [g.next_kernel for g in r["gaps"]] == ["gemm_a", "sample"]
    assert r["gaps"][1].launch == "cudaLaunchKernel"
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_trace()))
    trace_gaps.main([str(path)])
    out = capsys.readouterr().out
    assert "busy 0.15 ms" in out and "cudaGraphLaunch in aten::copy_" in out


def test_a_cpu_only_trace_is_a_clear_error():
    with pytest.raises(SystemExit, match="no GPU events"):
        trace_gaps.analyse({"traceEvents": [_x("aten::mm", "cpu_op", 0, 5)]})
