"""The replay of a measured W3 point stays where PLANNER.md says it is (a regression anchor, not a fit)."""

from __future__ import annotations

import pytest

from meshserve.simulator.validation import RESULTS, W3_H200_RUNS, measured_points, replay_w3

RUN = W3_H200_RUNS[0]


@pytest.mark.skipif(not (RESULTS / RUN.file).is_file(), reason="measured results not in this checkout")
def test_w3_qps32_matches_the_h200_measurement():
    measured = measured_points(RUN)[32.0]
    predicted = replay_w3(32.0, RUN.slo)
    assert predicted["goodput"] == pytest.approx(measured["goodput"], rel=0.05)
    assert predicted["tpot_p50"] == pytest.approx(measured["tpot_p50"], rel=0.15)
    assert predicted["itl_p50"] == pytest.approx(measured["itl_p50"], rel=0.15)
