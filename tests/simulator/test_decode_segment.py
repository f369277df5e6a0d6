"""Closed-form decode segments against the same steps laid out one by one."""

from __future__ import annotations

import bisect
import random

import pytest

from meshserve.planner.hardware import get_gpu
from meshserve.planner.model import load_model
from meshserve.simulator.decode_segment import DecodeSegment
from meshserve.simulator.frontend import FrontEnd, FrontEndCosts
from meshserve.simulator.metrics import RunRecorder
from meshserve.simulator.step_cost import StepCost


@pytest.fixture(scope="module")
def cost() -> StepCost:
    return StepCost(load_model("llama-3.1-8b"), get_gpu("H100-SXM"), tp=2)


def _laid_out(cost: StepCost, n: int, context: int, steps: int, start: float, head: float | None = None):
    durations = cost.decode_durations(n, context, steps)
    if head is not None:
        durations[0] = head
    ends, t = [], start
    for d in durations:
        t += d
        ends.append(t)
    return ends


@pytest.mark.parametrize(
    "n, context, head", [(1, 600, None), (12, 7000, None), (200, 150_000, None), (12, 7000, 0.031)]
)
def test_end_times_and_step_in_flight_match_the_laid_out_steps(cost, n, context, head):
    a, b = cost.decode_line(n, context)
    seg = DecodeSegment(100.0, a, b, n, 500, head)
    ends = _laid_out(cost, n, context, 500, 100.0, head)
    for k in (1, 2, 17, 500):
        assert seg.end_s(k) == pytest.approx(ends[k - 1], rel=1e-12)
    rng = random.Random(0)
    probes = [rng.uniform(99.9, ends[-1] + 0.1) for _ in range(300)] + [
        seg.end_s(k) for k in (1, 5, 499, 500)
    ]
    for t in probes:
        assert seg.steps_ended_before(t) == bisect.bisect_left([seg.end_s(k) for k in range(1, 501)], t)


def _step_by_step(seg: DecodeSegment, upto: int, frontend: FrontEnd | None, last_seen: float):
    """The reference: each step's tokens delivered alone, one gap per sequence."""
    rec = RunRecorder()
    for k in range(1, upto + 1):
        t = seg.end_s(k)
        seen = t if frontend is None else frontend.deliver(t, seg.n)
        for _ in range(seg.n):
            rec.add_itl(seen - last_seen)
        last_seen = seen
    return rec, last_seen


# none, light, saturated (work > step time: every gap is the work, kept off a bin edge here, where the two
# orders of float operations could round a gap to either side)
@pytest.mark.parametrize("per_token_s", [0.0, 50e-6, 2.01e-3])
def test_delivery_gives_the_gaps_and_front_end_state_of_step_by_step(cost, per_token_s):
    n, context = 8, 5000
    a, b = cost.decode_line(n, context)
    costs = FrontEndCosts(0.0, per_token_s)
    fe_fast = FrontEnd(costs) if per_token_s else None
    fe_ref = FrontEnd(costs) if per_token_s else None
    if fe_fast is not None:  # a backlog from an intake just before the segment
        fe_fast.submit(0.99, 0.02), fe_ref.submit(0.99, 0.02)
    seg = DecodeSegment(1.0, a, b, n, 400)
    ref, ref_seen = _step_by_step(seg, 400, fe_ref, 0.98)
    rec = RunRecorder()
    seen = seg.deliver(150, fe_fast, rec, 0.98)  # in two pieces, as an intake between them would cut it
    seen = seg.deliver(400, fe_fast, rec, seen)
    assert seen == pytest.approx(ref_seen, rel=1e-12)
    rec._flush_itl(), ref._flush_itl()
    assert rec.itl_counts.sum() == ref.itl_counts.sum() == 400 * n
    moved = abs(rec.itl_counts - ref.itl_counts).sum()  # a gap on a bin edge may round the other way
    assert moved <= 2 * n
    if fe_fast is not None:
        assert fe_fast.busy_s == pytest.approx(fe_ref.busy_s)
        assert fe_fast.t + fe_fast.backlog_s == pytest.approx(fe_ref.t + fe_ref.backlog_s, rel=1e-12)


@pytest.mark.parametrize("head", [None, 0.031])
def test_a_noisy_segment_lays_out_the_noisy_steps(cost, head):
    """With step-time noise the end times are the noisy steps' sums (NoiseStream.apply, one by one), found
    lazily, and delivery gives the gaps and front-end state of step-by-step."""
    from meshserve.simulator.decode_segment import NoisyDecodeSegment
    from meshserve.simulator.step_noise import NoiseStream, load_step_noise

    n, context, first, total = 12, 7000, 3000, 2500  # steps 3000.. of the replica: across noise chunks
    a, b = cost.decode_line(n, context)
    noise = NoiseStream(load_step_noise(), seed=3, index=1)
    seg = NoisyDecodeSegment(
        100.0, a, b, n, total, noise, first, head, 0.02 if head else 0.0, n, [] if head else None
    )
    ends, t = [], 100.0
    for j in range(1, total + 1):
        t += head if j == 1 and head else noise.apply(first + j - 1, a + b * j, False, 0)[0]
        ends.append(t)
    assert seg.steps_ended_before(100.0) == 0 and len(seg.ends) < total  # laid out as far as asked
    rng = random.Random(1)
    for probe in sorted(rng.uniform(100.0, ends[-1] + 0.1) for _ in range(200)):
        assert seg.steps_ended_before(probe) == bisect.bisect_left(ends, probe)
    assert [seg.end_s(k) for k in (1, 2, 1024, total)] == pytest.approx(
        [ends[k - 1] for k in (1, 2, 1024, total)], rel=1e-12
    )
    assert ends[-1] - 100.0 != pytest.approx(sum(a + b * j for j in range(1, total + 1)), rel=1e-3)  # noisy
    fe_fast, fe_ref = FrontEnd(FrontEndCosts(0.0, 50e-6)), FrontEnd(FrontEndCosts(0.0, 50e-6))
    ref, ref_seen = _step_by_step(seg, total, fe_ref, 99.0)
    rec = RunRecorder()
    seen = seg.deliver(700, fe_fast, rec, 99.0)
    seen = seg.deliver(total, fe_fast, rec, seen)
    assert seen == pytest.approx(ref_seen, rel=1e-12)
    rec._flush_itl(), ref._flush_itl()
    assert rec.itl_counts.sum() == ref.itl_counts.sum() == total * n
    assert abs(rec.itl_counts - ref.itl_counts).sum() <= 2 * n
    assert fe_fast.t + fe_fast.backlog_s == pytest.approx(fe_ref.t + fe_ref.backlog_s, rel=1e-12)


@pytest.mark.parametrize("head", [None, 0.031])
def test_counting_on_from_steps_known_ended_gives_the_solved_count(cost, head):
    """steps_ended_since(t, k), k steps known to end before t (an earlier intake delivered them), counts on from
    k (one or two step ends) or solves anew: the same count as steps_ended_before(t) wherever k is below it."""
    a, b = cost.decode_line(12, 7000)
    seg = DecodeSegment(100.0, a, b, 12, 40, head)
    ends = [seg.end_s(k) for k in range(1, 41)]
    rng = random.Random(2)
    probes = [rng.uniform(99.9, ends[-1] + 0.1) for _ in range(300)] + ends + [ends[-1] + 1.0]
    counted_on = 0
    for t in probes:
        solved = seg.steps_ended_before(t)
        for k in range(solved + 1):
            assert seg.steps_ended_since(t, k) == solved
        counted_on += solved > 0 and seg.steps_ended_since(t, solved - 1) == solved
    assert counted_on > 100
