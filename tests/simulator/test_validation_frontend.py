"""validation_frontend.py: FRONTEND_H200 is what the eighteenth session's CPU log and the light-load TTFT give."""

import pytest

from meshserve.simulator.frontend import FRONTEND_H200
from meshserve.simulator.validation import RESULTS

pytestmark = pytest.mark.skipif(not (RESULTS / "h200_1202_s18" / "w3_qwen_pdl_auto.tgz").is_file(),
                                reason="measured results not in this checkout")


def test_the_measured_run_fixes_an_admitted_request_and_a_refusal_but_not_the_split():
    from meshserve.simulator.frontend_fit import collinearity, fit_admitted
    from meshserve.simulator.validation_frontend import cpu_points

    points = [p for _, p in cpu_points()]
    assert [p.qps for p in points] == [256.0, 384.0, 512.0, 384.0] and {p.processes for p in points} == {4}
    corr, cond = collinearity(points)
    assert corr > 0.99 and cond > 100  # 128 tokens a request at every point
    whole = fit_admitted(points)
    assert whole.per_admitted_s == pytest.approx(11.9e-3, abs=0.1e-3)  # PLANNER.md
    assert whole.per_refusal_s == pytest.approx(1.0e-3, abs=0.1e-3)
    tokens_per_request = sum(p.tokens for p in points) / sum(p.admitted for p in points)
    default = FRONTEND_H200.per_request_s + tokens_per_request * FRONTEND_H200.per_token_s
    assert default == pytest.approx(whole.per_admitted_s, abs=whole.per_admitted_se_s)
    assert FRONTEND_H200.per_refusal_s == pytest.approx(whole.per_refusal_s, abs=0.05e-3)


def test_the_default_intake_gives_the_light_load_ttft_less_the_connect_time():
    """The pin: at the fifteenth session's QPS 64 (no fixed latency) the default's TTFT p50 is the measured less
    the client's connect p50 (9.7 ms), within the rounding of the default; 8.7 ms per request said 13.3."""
    from meshserve.simulator.validation import measured_points
    from meshserve.simulator.validation_frontend import cpu_points, light_load_ttft
    from meshserve.simulator.validation_qwen import LATENCY_QPS, QWEN_RUNS

    points = [p for _, p in cpu_points()]
    light = measured_points(QWEN_RUNS[0])[LATENCY_QPS]
    target = light["ttft_p50"] - light["connect_p50"]
    assert light_load_ttft(FRONTEND_H200.per_request_s, points) == pytest.approx(target, abs=0.1e-3)
    assert light_load_ttft(8.7e-3, points) > target + 3e-3


@pytest.mark.slow
def test_the_refit_rounds_to_the_default():
    from meshserve.simulator.validation_frontend import refit

    pinned = refit().pinned
    assert pinned.per_request_s == pytest.approx(FRONTEND_H200.per_request_s, abs=0.05e-3)
    assert pinned.per_token_s == pytest.approx(FRONTEND_H200.per_token_s, abs=0.5e-6)
    assert pinned.per_refusal_s == pytest.approx(FRONTEND_H200.per_refusal_s, abs=0.05e-3)
