"""The speculation gate: on while measured acceptance pays for the verify step's extra work, off when it does
not (compute-bound batches, low acceptance), and probing while off so it can turn back on."""

from __future__ import annotations

import pytest

from meshserve.engine.step_time import DeviceRates, StepTimeModel
import math

from meshserve.spec_decode.gate import PROBE_STRIDE, WARMUP_DRAFTS, SpeculationGate, expected_tokens

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
    assert expected_tokens(0.5, 2) == pytest.approx(2.0)
    # the H200's batch-64 replay (issue 22): share 0.263 of 5120 proposals accepted, 1280 rows of k = 4,
    # mean accepted length 2.05 (1344 accepted + 1280 own tokens over 1280 rows)
    assert expected_tokens(1344 / 5120, 4) == pytest.approx((1344 + 1280) / 1280)


def test_short_proposals_count_as_short():
    # n-gram rows proposing 2 of k = 4, all accepted: 3 tokens a row, not 5
    gate = SpeculationGate(4, MODEL)
    for _ in range(WARMUP_DRAFTS * 4):
        gate.observe(2, 2)
    assert gate.acceptance == pytest.approx(1.0) and gate.proposed == pytest.approx(2.0)
    gate.observe_step(64, True, 0.0171)
    gate.observe_step(64, True, 0.0171)
    gate.observe_step(64, False, 0.0057)
    gate.observe_step(64, False, 0.0057)
    assert not gate.pays(batch=64, context_tokens=64 * 300)  # 3 tokens at 3x a plain step's time


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
    decisions = [gate.decide(1, 600) for _ in range(12)]
    # off, probing after 4 steps, then twice as far apart while the probes find it still does not pay
    assert decisions == [False, False, False, True] + [False] * 7 + [True]
    assert gate.num_probes == 2 and gate.probe_stride(1) == 1  # batch 1: the probe is the whole batch
    for _ in range(200):  # the probes find acceptance again
        gate.observe(4, 4)
    assert gate.decide(1, 600) and gate.is_on


def test_no_step_model_means_always_on():
    gate = SpeculationGate(4, None)
    for _ in range(100):
        gate.observe(4, 0)
    assert gate.decide(512, 10**6)


def _fed(acceptance: float, k: int, batch: int, plain_s: float, verify_s: float) -> tuple[SpeculationGate, list]:
    """A gate with measured acceptance, then 40 steps at `batch` whose device times it is told, as the engine
    tells it: a verify step takes verify_s, a plain one plain_s. Returns the gate and its decisions."""
    gate = _gate(acceptance, k)
    decisions = []
    for _ in range(40):
        on = gate.decide(batch, batch * 300)
        decisions.append(on)
        gate.observe_step(batch, on, verify_s if on else plain_s)
    return gate, decisions


def test_measured_times_turn_off_what_the_model_keeps_on():
    # issue 22 (H200, batch 64, k = 2): the model prices 192 rows like 64 and keeps speculating; measured, a
    # verify step costs ~2.2x a plain one, so 2 tokens a verify row (acceptance 0.5) do not pay
    model_only = _gate(0.5, k=2)
    assert model_only.pays(batch=64, context_tokens=64 * 300)
    gate, decisions = _fed(0.5, 2, 64, plain_s=0.010, verify_s=0.0225)
    assert decisions[0]  # nothing measured: on
    assert not gate.pays(batch=64, context_tokens=64 * 300) and not gate.is_on
    assert sum(decisions[10:]) <= 2  # off, probing every 16 steps
    # the same verify cost at full acceptance (k + 1 = 3 tokens per step) pays, and stays on
    gate, decisions = _fed(1.0, 2, 64, plain_s=0.010, verify_s=0.0225)
    assert gate.is_on and gate.pays(batch=64, context_tokens=64 * 300)


def test_plain_steps_are_spent_only_where_the_bandwidth_floor_cannot_decide():
    # batch 1, verify 7.4 ms (the H200's): at acceptance 0.9 (4.1 tokens a step) it beats even a plain step at
    # the data sheet's bandwidth (4 ms here), so no plain step is spent measuring
    gate, decisions = _fed(0.9, 4, 1, plain_s=0.00476, verify_s=0.0074)
    assert all(decisions) and gate.num_plain_probes == 0 and gate.is_on
    # at acceptance 0.25 (2 tokens) and a verify step of 11 ms it might not: two plain steps measure it
    # (4.76 ms: 2 / 11 < 1 / 4.76)
    gate, decisions = _fed(0.25, 4, 1, plain_s=0.00476, verify_s=0.011)
    assert decisions[:2] == [True, True] and decisions[2:4] == [False, False] and gate.num_plain_probes == 2
    assert gate.measured.times(1) is not None and not gate.is_on
    assert gate.measured.times(64) is None  # another batch size is measured on its own


def _run_at_batch_64(acceptance: float, k: int, plain_s: float, verify_s: float, steps: int = 256):
    """A fake clock: `steps` decode steps of 64 sequences as the engine runs them (the first one plain: it
    was scheduled before any proposals), a verify row accepting acceptance * k of its k proposals, a step
    taking plain_s plus (verify_s - plain_s) x the share of rows verifying. The gate is told each step's
    verify rows and, for pure plain or verify steps, the time (as Speculator.after_step does).
    Returns (throughput against plain steps, verify rows, the gate)."""
    batch = 64
    gate = SpeculationGate(k, MODEL)
    tokens = seconds = 0.0
    rows_verifying = 0
    verify_rows_total = 0
    for _ in range(steps):
        share = rows_verifying / batch
        t = plain_s + (verify_s - plain_s) * share
        seconds += t
        accepted = round(acceptance * k)
        tokens += batch + rows_verifying * accepted
        for _ in range(rows_verifying):
            gate.observe(k, accepted)
        if rows_verifying in (0, batch):
            gate.observe_step(batch, rows_verifying > 0, t)
        verify_rows_total += rows_verifying
        on = gate.decide(batch, batch * 600)
        rows_verifying = math.ceil(batch / gate.probe_stride(batch)) if on else 0
    return (tokens / seconds) / (batch / plain_s), verify_rows_total, gate


def test_batch_64_low_acceptance_costs_at_most_3_percent():
    # the H200 (issue 22, 2026-12-01): plain 5.7 ms, a k = 4 verify step ~3x that; acceptance 0.26
    # (1.35 tokens a verify step) lost 5% with full probes every 16 steps
    speed, verify_rows, gate = _run_at_batch_64(0.26, 4, plain_s=0.0057, verify_s=0.0171)
    assert speed >= 0.97 and not gate.is_on
    assert gate.num_probes >= 3  # still probing, with a share of the rows
    assert verify_rows <= 64 * 3 + gate.num_probes * 64 // PROBE_STRIDE
    # the same at k = 2 (verify ~2.2x plain), acceptance 0.3
    speed, _, gate = _run_at_batch_64(0.3, 2, plain_s=0.0057, verify_s=0.0126)
    assert speed >= 0.97 and not gate.is_on


def test_batch_64_full_acceptance_stays_on():
    # 5 tokens a verify step at 3x a plain step's time: speculation pays (the H200's 1.65x)
    speed, _, gate = _run_at_batch_64(1.0, 4, plain_s=0.0057, verify_s=0.0171)
    assert gate.is_on and speed > 1.5
    # 4 tokens a verify row (share 0.75) still pays ~1.3x: on (the geometric formula, fed the share, saw
    # 3.05 tokens there and turned off)
    speed, _, gate = _run_at_batch_64(0.75, 4, plain_s=0.0057, verify_s=0.0171)
    assert gate.is_on and speed > 1.25


def test_partial_probes_turn_speculation_back_on_when_acceptance_returns():
    gate = SpeculationGate(4, MODEL)
    batch = 64
    for _ in range(WARMUP_DRAFTS * 4):
        gate.observe(4, 0)
    for _ in range(3):
        gate.observe_step(batch, True, 0.0171)
        gate.observe_step(batch, False, 0.0057)
    strides = []
    for _ in range(200):
        on = gate.decide(batch, batch * 600)
        if on and not gate.is_on:
            strides.append(gate.probe_stride(batch))
    assert strides and set(strides) == {PROBE_STRIDE}  # the verify time is fresh: partial probes
    steps = 0
    while not gate.is_on and steps < 200:  # the traffic turns predictable: the probes' rows see it
        on = gate.decide(batch, batch * 600)
        if on:
            for _ in range(batch // gate.probe_stride(batch)):
                gate.observe(4, 4)
        steps += 1
    assert gate.is_on and gate.probe_stride(batch) == 1
