"""The scheduler driven by a step-time model and service-level targets: capped batches, shedding, priorities."""

from __future__ import annotations

import time

from meshserve.engine.scheduling_policy import MAX_CREDIT_TARGETS, MIN_PREFILL_CHUNK, TARGET_MARGIN
from meshserve.engine.sequence import SequenceStatus
from meshserve.engine.step_time import DeviceRates, StepShape, StepTimeModel
from tests.engine.test_scheduler import make_sched, make_seq, step

# 1 ms overhead + 2 GB of weights at 1 TB/s and 80% (2.5 ms), 0.125 ms per 1,000 KV tokens read, prefill
# compute-bound past ~100 tokens (2 x 1e9 params / 1e14 FLOP/s = 0.025 ms per token at 80%)
MODEL = StepTimeModel(weight_bytes=2e9, kv_bytes_per_token=1e5, rates=DeviceRates(bandwidth=1e12, flops=1e14))


def _shape(out) -> StepShape:
    return StepShape(out.num_batched_tokens, len(out.scheduled),
                     sum(e.num_computed_tokens + e.num_new_tokens for e in out.scheduled))


def _with_model(num_blocks: int = 20000, **config):
    s = make_sched(num_blocks=num_blocks, max_model_len=1024, max_num_batched_tokens=2048, **config)
    s.policy.step_model = MODEL
    return s


def test_overload_never_breaks_the_tpot_target():
    target = 0.020
    s = _with_model(slo_tpot_s=target)
    seqs = [make_seq(f"r{i}", range(i, i + 400), max_tokens=24) for i in range(300)]
    for seq in seqs:
        s.add(seq)
    most_running, decode_step_times = 0, []
    while s.has_unfinished():
        pending = sum(q.num_tokens - q.num_computed_tokens for q in s.running if q.num_tokens - q.num_computed_tokens > 1)
        pending += s.waiting[0].num_prompt_tokens if s.waiting else 0
        out = step(s)
        most_running = max(most_running, s.num_running)
        decodes = [e for e in out.scheduled if e.num_new_tokens == 1]
        if not decodes:
            continue  # a step with no decodes slows nobody's time per output token
        t = MODEL.predict(_shape(out))
        decode_step_times.append(t)
        # one step may spend what earlier short steps saved, never more
        assert t <= target * (TARGET_MARGIN + MAX_CREDIT_TARGETS) + 1e-9
        prefill = out.num_batched_tokens - len(decodes)
        assert prefill == 0 or prefill >= min(MIN_PREFILL_CHUNK, pending)  # chunks, not a dribble in every step
    # the running requests' time per output token, averaged over the steps they decoded in, meets the target
    assert sum(decode_step_times) / len(decode_step_times) <= target
    assert all(seq.status == SequenceStatus.FINISHED_LENGTH for seq in seqs)  # none lost
    assert 20 < most_running < 300  # the batch was capped, not filled with everyone
    assert not s.shed


def test_overload_takes_one_prompt_chunk_per_step_and_keeps_every_decode():
    """With a loose TPOT target the step-time model alone would let ~2,000 prompt tokens join a step; the
    policy's chunk cap holds it to slo_prefill_chunk, and no decode loses its token to a prompt chunk ahead of it
    in the running list. Nothing is lost or hangs."""
    target, chunk = 0.100, 512
    s = _with_model(slo_tpot_s=target, slo_prefill_chunk=chunk)
    assert MODEL.max_prefill_tokens(target * TARGET_MARGIN, 64, 64 * 500) > 2 * chunk  # the cap is what binds
    seqs = [make_seq(f"r{i}", range(i, i + 300 + (i % 3) * 300), max_tokens=16) for i in range(200)]
    for seq in seqs:
        s.add(seq)
    steps = capped = 0
    while s.has_unfinished():
        decoding = {q.seq_id for q in s.running if q.num_tokens - q.num_computed_tokens == 1}
        out = step(s)
        steps += 1
        assert steps < 5000  # no hang
        if not decoding:
            continue  # nobody's time per output token to protect: the static budget
        assert decoding <= {e.seq_id for e in out.scheduled}  # every decode got its token
        prompt_tokens = sum(e.num_new_tokens for e in out.scheduled if e.seq_id not in decoding)
        assert prompt_tokens <= chunk
        capped += prompt_tokens == chunk
        assert MODEL.predict(_shape(out)) <= target * (TARGET_MARGIN + MAX_CREDIT_TARGETS) + 1e-9
    assert capped > 10  # the cap was what bound, many times
    assert all(seq.status == SequenceStatus.FINISHED_LENGTH and seq.num_output_tokens == 16 for seq in seqs)
    assert not s.shed


def test_without_targets_the_schedule_is_unchanged():
    def run(with_model: bool) -> list[list[tuple[str, int]]]:
        s = _with_model() if with_model else make_sched(num_blocks=20000, max_model_len=1024,
                                                        max_num_batched_tokens=2048)
        for i in range(40):
            s.add(make_seq(f"r{i}", range(i, i + 100 + i), max_tokens=5))
        trace = []
        while s.has_unfinished():
            trace.append([(e.seq_id, e.num_new_tokens) for e in step(s).scheduled])
        return trace

    assert run(True) == run(False)


def test_late_requests_are_shed_before_they_use_a_step():
    s = _with_model(slo_ttft_s=0.5)
    fresh, stale = make_seq("fresh", range(50)), make_seq("stale", range(50, 100))
    stale.arrival_time = time.monotonic() - 2.0  # waited 2 s already: its 0.5 s target is gone
    s.add(stale)
    s.add(fresh)
    out = step(s)
    assert [e.seq_id for e in out.scheduled] == ["fresh"]
    assert s.shed == [stale] and stale.status == SequenceStatus.FINISHED_ABORTED
    kept = _with_model(slo_ttft_s=0.5, slo_shed_late=False)
    late = make_seq("late", range(50))
    late.arrival_time = time.monotonic() - 2.0
    kept.add(late)
    assert [e.seq_id for e in step(kept).scheduled] == ["late"] and not kept.shed


def test_a_waiting_sequence_that_already_answered_is_never_shed():
    """A disaggregated consumer admits a transferred prompt into the waiting queue with the producer's first
    token already sent: however old its arrival, its TTFT is past and it must decode, not be dropped."""
    s = _with_model(slo_ttft_s=0.5)
    handed = make_seq("handed", range(50), max_tokens=4)
    handed.arrival_time = time.monotonic() - 2.0
    handed.num_computed_tokens = handed.num_cached_tokens = handed.num_prompt_tokens
    handed.output_token_ids.append(7)
    s.seqs[handed.seq_id] = handed
    s.waiting.append(handed)
    step(s)
    assert not s.shed and handed.status != SequenceStatus.FINISHED_ABORTED


def test_requests_too_deep_in_the_queue_are_shed_from_the_back():
    """At the recent admission rate (about 10 a second here) a fresh request behind ten others cannot start
    within a 1 s target: the back of the queue is shed, the front kept, in queue order."""
    s = _with_model(slo_ttft_s=1.0, max_num_seqs=1)  # the batch is full: nobody is admitted this step
    now = time.monotonic()
    for k in range(21):
        s.policy.record_admission(now - 2.0 + 0.1 * k)
    s.add(make_seq("busy", range(50), max_tokens=64))
    step(s)
    queued = [make_seq(f"q{i}", range(i, i + 50)) for i in range(30)]
    for seq in queued:
        s.add(seq)
    step(s)
    shed = len(s.shed)
    assert 17 <= shed <= 21 and s.shed == queued[-shed:]  # ~10 of 30 can start within the second
    assert list(s.waiting) == queued[:-shed]
    assert all(seq.status == SequenceStatus.FINISHED_ABORTED for seq in s.shed)


def test_a_request_target_overrides_the_server_default():
    s = _with_model()  # no server targets
    seq = make_seq("own", range(50))
    seq.slo_ttft_s, seq.arrival_time = 0.1, time.monotonic() - 1.0
    s.add(seq)
    step(s)
    assert s.shed == [seq]


def test_priority_orders_the_queue_and_picks_the_least_urgent_victim():
    s = make_sched(max_num_seqs=1, scheduling_policy="priority")
    for name, prio in [("c", 3), ("a", 1), ("b", 2), ("a2", 1)]:
        seq = make_seq(name, range(8), max_tokens=1)
        seq.priority = prio
        s.add(seq)
    order = []
    while s.has_unfinished():
        order += [e.seq_id for e in step(s).scheduled if e.do_sample]
    assert order == ["a", "a2", "b", "c"]

    p = make_sched(num_blocks=6, scheduling_policy="priority")  # room for 24 tokens
    urgent, lazy, mid = make_seq("urgent", range(8), 8), make_seq("lazy", range(8, 16), 8), make_seq("mid", range(16, 24), 8)
    urgent.priority, lazy.priority, mid.priority = 0, 9, 5
    for seq in (urgent, lazy, mid):
        p.add(seq)
    step(p)
    while "lazy" not in [q.seq_id for q in p.waiting] and p.has_unfinished():
        step(p)  # decoding grows the sequences until the pool runs dry
    assert lazy.num_preemptions == 1 and urgent.num_preemptions == 0 and mid.num_preemptions == 0


def test_admission_rate_counts_only_busy_gaps():
    """Idle time between requests is not service time: after a quiet spell the rate is that of admissions made
    while others waited (here 20 a second), not the lightly loaded arrivals' (a request every 5 s)."""
    s = _with_model(slo_ttft_s=1.0)
    p = s.policy
    for k in range(3):  # lightly loaded: nobody was waiting behind these
        p.record_admission(100.0 + 5.0 * k, queue_behind=False)
    assert p.admission_rate(111.0) is None
    for k in range(5):  # a burst: each admission left others queued
        p.record_admission(111.0 + 0.05 * k, queue_behind=True)
    assert abs(p.admission_rate(111.3) - 20.0) < 1e-6  # the gap back to t=110 is not counted


def test_step_budget_counts_decodes_context_and_prompt_tokens_left():
    """The budget from one pass over the batch: each decode's token, the model's prefill room for the decodes'
    context, dropped to 0 while it is smaller than the prompt tokens left (running chunks + the queue's head)."""
    s = _with_model(slo_tpot_s=0.010)
    decodes = [make_seq(f"d{i}", range(100 * i, 100 * i + 300)) for i in range(4)]
    for seq in decodes:
        seq.num_computed_tokens = seq.num_tokens - 1  # one token to compute: a decode
    prefill = make_seq("p", range(2000))
    prefill.num_computed_tokens = 1500  # 500 prompt tokens left
    head = make_seq("w", range(700))
    context = sum(seq.num_tokens for seq in decodes)
    room = MODEL.max_prefill_tokens(0.010 * TARGET_MARGIN, 4, context, limit=min(2048 - 4, 1024))
    assert 0 < room < MIN_PREFILL_CHUNK  # the prompt tokens left (500 + 700) ask for a full chunk: wait for one
    budget = s.policy.step_budget([*decodes, prefill], [head])
    assert (budget.tokens, budget.prefill_tokens) == (4, 0)
    # with fewer prompt tokens left than the room, they go now
    prefill.num_computed_tokens = 2000 - (room - 1)
    budget = s.policy.step_budget([*decodes, prefill], [])
    assert (budget.tokens, budget.prefill_tokens) == (4 + room, room)
    # nobody decoding, or no target: the static budget
    assert s.policy.step_budget([prefill], [head]).tokens == 2048
    assert _with_model().policy.step_budget([*decodes, prefill], [head]).tokens == 2048


def test_with_pipeline_steps_in_flight_the_tpot_policy_predicts_one_steps_share():
    """PP with two steps in flight: a step holds half the running sequences (at most max_num_seqs), so admission
    and the step budget predict that step, not one over all of them: 64 running at 1,000 tokens each is a
    65-sequence step over the target without pipelining (refused) and a 33-sequence one under it with (admitted)."""
    running = [make_seq(f"r{i}", range(1000)) for i in range(64)]
    for depth, admits in ((0, False), (2, True)):
        s = _with_model(slo_tpot_s=0.010, max_num_seqs=64, pipeline_depth=depth)
        assert s.policy.may_admit(make_seq("new", range(1000)), running) is admits
    s = _with_model(slo_tpot_s=0.010, max_num_seqs=16, pipeline_depth=2)
    assert s.policy.one_step_share(65, 65_000) == (16, 16_000)  # the share is one step's batch at most
    # a step's budget: a decode token for each of its share, and prompt tokens for the time that step leaves
    # (a 64-decode step leaves too few for a MIN_PREFILL_CHUNK chunk; a 32-decode one does)
    for seq in running:
        seq.num_computed_tokens = seq.num_tokens - 1
    head = [make_seq("p", range(2000))]
    one = _with_model(slo_tpot_s=0.022, max_num_seqs=64).policy.step_budget(running, head)
    assert (one.tokens, one.prefill_tokens) == (64, 0)
    two = _with_model(slo_tpot_s=0.022, max_num_seqs=64, pipeline_depth=2).policy.step_budget(running, head)
    extra = MODEL.max_prefill_tokens(0.022 * TARGET_MARGIN, 32, 32_000, limit=1024)
    assert (two.tokens, two.prefill_tokens) == (32 + extra, extra) and extra >= MIN_PREFILL_CHUNK



def test_a_target_no_batch_can_meet_still_runs_alone():
    """A TPOT target under even one sequence's predicted step (a request's own slo.tpot_ms of 1e-300 ms, found by
    fuzzing; or a --slo-tpot-ms below the model's batch-1 step) used to keep the request waiting forever, and
    everything queued behind it: an empty batch now admits it, so it runs alone, the best it can get, and the
    queue moves; behind it, others join only as their targets allow."""
    s = _with_model(slo_tpot_s=1e-9)
    first, second = make_seq("a", range(300)), make_seq("b", range(300))
    assert MODEL.predict(StepShape(1, 1, 300)) > 1e-9
    assert s.policy.may_admit(first, [])
    assert not s.policy.may_admit(second, [first])
    for seq in (first, second):
        s.add(seq)
    for _ in range(50):
        step(s)
        if first.is_finished and second.is_finished:
            break
    assert first.status is second.status is SequenceStatus.FINISHED_LENGTH
    # a request's own such target is dropped once it runs alone: it does not hold the batch to it
    s = _with_model()
    tight, plain = make_seq("t", range(300)), make_seq("p", range(300))
    tight.slo_tpot_s = 1e-9

    def admit(seq, running):  # as the scheduler does: ask, then record the admission in the tally
        tally = s.policy.running_tally(running)
        ok = s.policy.may_admit(seq, running, tally)
        if ok:
            s.policy.admitted(tally, seq)
        return ok

    assert admit(tight, []) and tight.slo_tpot_s is None
    assert admit(plain, [tight])
    tight.slo_tpot_s = 0.5  # one it can meet alone is kept
    assert admit(tight, []) and tight.slo_tpot_s == 0.5


def test_may_admit_with_a_running_tally_decides_as_the_pass_over_the_batch():
    """The scheduler tallies the running batch once a step and extends the tally with each admission
    (running_tally, admitted); may_admit then decides as walking the batch would, over random batches: own
    and default targets or none, outputs and pending tokens, pipeline shares, admissions one after another."""
    import random

    rng = random.Random(7)
    decided = set()
    for trial in range(150):
        default = rng.choice([None, 0.004, 0.010, 0.030])
        # the policy never reads the KV cache: a small pool (20,000 blocks took ~0.1 s a trial, 90% of the test)
        s = _with_model(num_blocks=64, slo_tpot_s=default, max_num_seqs=rng.choice([16, 256]),
                        pipeline_depth=rng.choice([0, 0, 2]))
        if trial % 10 == 0:
            s.policy.step_model = None  # no model: everyone admitted, no tally
        running = []
        for i in range(rng.randrange(0, 80)):
            seq = make_seq(f"r{i}", range(rng.randrange(1, 900)))
            seq.output_token_ids = [5] * rng.randrange(0, 40)
            seq.num_pending_tokens = rng.randrange(0, 2)
            seq.slo_tpot_s = rng.choice([None, None, 0.005, 0.020])
            running.append(seq)
        tally = s.policy.running_tally(running)
        for j in range(rng.randrange(1, 20)):
            seq = make_seq(f"w{j}", range(rng.randrange(1, 900)))
            seq.output_token_ids = [6] * rng.choice([0, 0, rng.randrange(1, 30)])  # a preempted one's recompute
            seq.slo_tpot_s = rng.choice([None, None, 0.003, 0.008, 0.050])
            walked = s.policy.may_admit(seq, running)
            assert s.policy.may_admit(seq, running, tally) is walked
            decided.add(walked)
            running.append(seq)  # admitted either way: the tally must follow any batch
            s.policy.admitted(tally, seq)
        if tally is not None:
            assert tally == s.policy.running_tally(running)
    assert decided == {True, False}  # both outcomes were exercised
