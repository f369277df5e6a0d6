"""tools/step_fit_windows.py on a synthetic step trace: two QPS windows whose steps take a known multiple of the
fit, one of them host-bound."""

import importlib.util
import sys
from pathlib import Path

import pytest

from meshserve.engine.step_time import StepShape
from meshserve.planner.hardware import get_gpu
from meshserve.planner.model import load_model
from meshserve.simulator.step_cost import StepCost, calibration_for, load_calibration

_spec = importlib.util.spec_from_file_location(
    "step_fit_windows", Path(__file__).parents[2] / "tools" / "step_fit_windows.py"
)
sfw = importlib.util.module_from_spec(_spec)
sys.modules["step_fit_windows"] = sfw  # dataclasses look their module up there
_spec.loader.exec_module(sfw)


@pytest.fixture(scope="module")
def cost():
    return StepCost(load_model("qwen3-0.6b"), get_gpu("H200"),
                    weights=load_calibration(calibration_for("default", "qwen3-0.6b")))


def _rows(cost, t0, scale, wait_s, n=20):
    """n steps from t0, 10 ms apart: even ones the knee's shape (1,250 tokens, 250 seqs), odd ones small decodes."""
    rows = []
    for i in range(n):
        tokens, seqs, running = (1250, 250, 250) if i % 2 == 0 else (8, 8, 8)
        context = 147_000 if i % 2 == 0 else 4_000
        fit = cost(StepShape(tokens, seqs, context))
        rows.append({"t": t0 + 0.01 * i, "tokens": tokens, "seqs": seqs, "context": context, "running": running,
                     "actual_s": scale * fit, "wait_s": wait_s})
    return rows


def test_windows_split_at_idle_gaps_and_price_steps_against_the_fit(cost):
    rows = _rows(cost, 100.0, 1.12, 0.0) + _rows(cost, 110.0, 0.95, 0.003)
    windows = [sfw.window(w, cost) for w in sfw.split_windows(rows, gap_s=2.0)]
    assert [len(w.actual) for w in windows] == [20, 20]
    slow, fast = windows
    for w, scale in ((slow, 1.12), (fast, 0.95)):
        assert sfw.ratio(w, w.running >= sfw.BUSY_RUNNING) == pytest.approx(scale)
        assert sfw.ratio(w, w.same_shape) == pytest.approx(scale)
        assert w.same_shape.sum() == 10  # the decodes are not the knee's shape
    text = sfw.describe(slow)
    assert "1.120" in text and "did not wait for the GPU in 100.0%" in text and "; - ms where it waited" in text
    assert "did not wait for the GPU in 0.0%" in sfw.describe(fast)


def test_eager_steps_are_described_with_the_engine_prediction_and_the_queue(cost):
    rows = _rows(cost, 100.0, 1.0, 0.0)
    for i, r in enumerate(rows):
        r.update(tokens=6000, seqs=200, predicted_s=0.03, waiting=5 if i % 2 else 0)
    w = sfw.window(rows, cost)
    text = sfw.describe_eager(w)
    assert text is not None and "the engine's own prediction 30.0" in text
    assert sfw.describe_eager(sfw.window(_rows(cost, 100.0, 1.0, 0.0), cost)) is None  # none past the graphs


def test_a_short_pause_does_not_split_a_window(cost):
    rows = _rows(cost, 100.0, 1.0, 0.0) + _rows(cost, 101.5, 1.0, 0.0)
    assert len(sfw.split_windows(rows, gap_s=2.0)) == 1
