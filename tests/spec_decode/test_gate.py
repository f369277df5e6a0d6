"""The speculation gate: on while measured acceptance pays for the verify step's extra work, off when it does
not (compute-bound batches, low acceptance), and probing while off so it can turn back on."""

from __future__ import annotations

import pytest

from meshserve.engine.step_time import DeviceRates, StepTimeModel
from meshserve.spec_decode.gate import WARMUP_DRAFTS, SpeculationGate, expected_tokens

# 16 GB of weights (an 8B model) at 4 TB/s and 800 TFLOP/s: batch 1 is memory-bound, batch 512 x 5 is not
MODEL = StepTimeModel(weight_bytes=16e9, kv_bytes_per_token=131072, rates=DeviceRates(4e12, 8e14))


def _gate(acceptance: float, k: int = 4) -> SpeculationGate:
    gate = SpeculationGate(k, MODEL)
    for i in range(WARMUP_DRAFTS * 4):
        gate.observe(k, round(acceptance * k))
    return gate


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_on_at_small_batch_with_good_acceptance_off_when_compute_bound_or_rejected():
    good = _gate(0.75)
    assert good.pays(batch=1, context_tokens=600)  # a verify step costs ~nothing more at batch 1
    assert not good.pays(batch=512, context_tokens=512 * 100)  # 5x the FLOPs for ~3.1 tokens
    bad = _gate(0.0)
    assert not bad.pays(batch=1, context_tokens=600)  # nothing accepted: the extra work is lost


def test_starts_on_and_probes_while_off():
    gate = SpeculationGate(4, MODEL, probe_every=4)
    assert gate.decide(512, 512 * 600)  # nothing measured yet
    for _ in range(WARMUP_DRAFTS):
        gate.observe(4, 0)
    decisions = [gate.decide(1, 600) for _ in range(8)]
    assert decisions == [False, False, False, True] * 2  # off, with a probe every fourth step
    for _ in range(200):  # the probes find acceptance again
        gate.observe(4, 4)
    assert gate.decide(1, 600) and gate.is_on


def test_no_step_model_means_always_on():
    gate = SpeculationGate(4, None)
    for _ in range(100):
        gate.observe(4, 0)
    assert gate.decide(512, 10**6)
