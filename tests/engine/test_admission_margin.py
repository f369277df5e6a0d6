"""The admission margin's feedback rule, driven by a fake server whose TTFT predictions miss by a known tail."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from meshserve.engine.admission_margin import AdmissionMargin, MarginRule

TARGET = 1.0


def serve(margin: AdmissionMargin | None, n: int, error, seed: int = 0, adapt: bool = True) -> list[float]:
    """n arrivals at a server past its knee: each sees a predicted TTFT between 0.5 and 1.2 x the target (the
    queue's wait as it comes and goes), is admitted under the margin (fixed 0.8 when margin is None), and its
    first token comes error() x target after the prediction. Returns the admitted requests' measured TTFTs."""
    rng = random.Random(seed)
    measured = []
    for _ in range(n):
        predicted = rng.uniform(0.5, 1.2) * TARGET
        if not (margin.admits(predicted, TARGET) if margin is not None else predicted <= 0.8 * TARGET):
            continue
        actual = predicted + error(rng) * TARGET
        measured.append(actual)
        if margin is not None and adapt:
            margin.observe(predicted, actual, TARGET)
    return measured


def tail(rng: random.Random) -> float:
    """Late by 0.05 typically and by ~0.3 of the target at the 99th percentile: W3's miss past the knee."""
    return 0.05 + 0.1 * abs(rng.gauss(0.0, 1.0))


def test_a_fixed_margin_misses_the_target_at_p99_and_the_feedback_brings_it_back():
    fixed = serve(None, 20_000, tail)
    assert np.percentile(fixed, 99) > 1.02 * TARGET  # the failure this rule exists for (W3: 1.04, 1.08)

    margin = AdmissionMargin()
    serve(margin, 20_000, tail)  # converge
    assert MarginRule().low < margin.value < 0.75
    later = serve(margin, 20_000, tail, seed=1, adapt=False)
    assert np.percentile(later, 99) <= TARGET
    # and it gave up no more than it had to: the admitted requests still reach close to the goal
    assert np.percentile(later, 99) > 0.9 * TARGET


def test_accurate_predictions_open_the_margin_to_its_bound_step_by_step():
    margin = AdmissionMargin()
    values = [margin.value]
    rng = random.Random(2)
    for _ in range(5_000):
        predicted = rng.uniform(0.4, 1.0) * TARGET
        if margin.admits(predicted, TARGET):
            margin.observe(predicted, predicted + 0.001, TARGET)
            values.append(margin.value)
    rule = margin.rule
    assert margin.value == pytest.approx(rule.high)
    assert max(abs(b - a) for a, b in itertools.pairwise(values)) <= rule.max_step + 1e-12


def test_huge_misses_cannot_close_the_door():
    margin = AdmissionMargin()
    for _ in range(1_000):
        margin.observe(0.7 * TARGET, 5.0 * TARGET, TARGET)
    assert margin.value == MarginRule().low and margin.admits(0.5 * TARGET, TARGET)


def test_light_load_says_nothing_about_the_margin():
    # predictions far under the target: the margin decided nothing there, however late they came
    margin = AdmissionMargin()
    for _ in range(1_000):
        margin.observe(0.1 * TARGET, 0.9 * TARGET, TARGET)
    assert margin.value == MarginRule().initial and margin.num_updates == 0


def test_errors_count_in_units_of_each_requests_own_target():
    margin = AdmissionMargin(MarginRule(min_samples=16, update_every=16, max_step=1.0))
    for _ in range(16):  # 0.2 s late against a 2 s target: 0.1 of it
        margin.observe(1.2, 1.4, 2.0)
    assert margin.value == pytest.approx(MarginRule().goal - 0.1)


def test_listeners_hear_every_update_with_its_error_quantile():
    margin = AdmissionMargin(MarginRule(min_samples=16, update_every=16))
    heard: list[tuple[float, int, float | None]] = []
    margin.add_listener(lambda m: heard.append((m.value, m.num_updates, m.last_error_quantile)))
    for _ in range(15):
        margin.observe(0.7, 0.9, TARGET)
    assert heard == [] and margin.last_error_quantile is None  # no update yet, nothing said
    margin.observe(0.7, 0.9, TARGET)
    assert heard == [(margin.value, 1, pytest.approx(0.2))] and margin.value == pytest.approx(MarginRule().goal - 0.2)
    for _ in range(16):
        margin.observe(0.1, 0.9, TARGET)  # light load: ignored, so no update to hear of
    assert len(heard) == 1
