"""Step deltas: a worker rebuilds every step exactly (params, block tables) from what rank 0 sends, which after
a sequence's first step is much less; rank 0's own step is left as it was."""

from __future__ import annotations

import copy
import pickle
import random

from meshserve.config import CacheConfig, SchedulerConfig
from meshserve.engine.scheduler import Scheduler
from meshserve.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from meshserve.engine.sequence import Sequence
from meshserve.engine.step_delta import StepDeltaReceiver, StepDeltaSender
from meshserve.engine.step_time import StepShape
from meshserve.sampling import SamplingParams


def _wire(
    sender: StepDeltaSender, receiver: StepDeltaReceiver, out: SchedulerOutput
) -> tuple[SchedulerOutput, int]:
    """out through the broadcast: stripped, pickled, unpickled, restored; and the bytes sent."""
    before = copy.deepcopy(out.scheduled)
    with sender.stripped(out):
        data = pickle.dumps(out)
    assert out.scheduled == before  # rank 0's runner sees its step unchanged
    return receiver.restore(pickle.loads(data)), len(data)


def _seq(seq_id: str, prompt: list[int], max_tokens: int, temperature: float = 0.6) -> Sequence:
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=len(seq_id))
    params._all_stop_token_ids = set()
    return Sequence(
        seq_id=seq_id,
        request_id=seq_id,
        index=0,
        prompt_token_ids=prompt,
        params=params,
        max_tokens=max_tokens,
    )


def test_workers_rebuild_every_step_of_a_scheduler_run_with_preemptions():
    """A run whose KV pool is too small (recomputes reallocate tables), with shared prefix blocks and a request
    id used again after it finished: every step a worker rebuilds equals rank 0's, and the decode steps carry
    a fraction of the full step's bytes."""
    s = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48, max_model_len=256),
        CacheConfig(block_size=4, num_blocks=40, enable_prefix_caching=True),
    )
    rng = random.Random(3)
    shared = [rng.randrange(100) for _ in range(8)]
    for i in range(12):
        s.add(
            _seq(
                f"r{i}", shared + [rng.randrange(100) for _ in range(rng.randint(2, 20))], rng.randint(6, 30)
            )
        )
    sender, receiver = StepDeltaSender(), StepDeltaReceiver()
    ratios, reused = [], False
    while s.has_unfinished():
        out = s.schedule()
        got, sent = _wire(sender, receiver, out)
        assert got.scheduled == out.scheduled and got.finished_seq_ids == out.finished_seq_ids
        if out.scheduled and all(e.num_new_tokens == 1 for e in out.scheduled):
            ratios.append(sent / len(pickle.dumps(out)))
        s.update_after_step(out, {e.seq_id: rng.randrange(100) for e in out.scheduled if e.do_sample})
        if not reused and "r0" in out.finished_seq_ids:  # the id again, with other params
            s.add(_seq("r0", shared + [1, 2, 3], 9, temperature=0.0))
            reused = True
    assert s.num_preemptions > 0 and reused
    assert ratios and max(ratios) < 0.6


def test_a_table_that_shrinks_and_regrows_is_resent_from_its_first_changed_block():
    """Rejected proposals trim a table; it may then grow with other blocks: the worker gets the new ones."""
    params = SamplingParams(max_tokens=8)
    sender, receiver = StepDeltaSender(), StepDeltaReceiver()
    tables = [[3, 4, 5, 6], [3, 4, 5, 6, 7], [3, 4, 5], [3, 4, 9, 10], [3, 4, 9, 10]]
    for table in tables:
        out = SchedulerOutput([ScheduledSequence("a", [1], 12, table, params, True)])
        got, _ = _wire(sender, receiver, out)
        assert got.scheduled[0].block_table == table and got.scheduled[0].params == params


def test_the_hook_never_leaves_and_the_masks_only_when_a_worker_samples():
    """The engine's before_sample hook (not even picklable here: a lambda) and the step's shape stay on rank 0;
    the grammar masks go along only when a worker samples (pipeline stages); rank 0's step keeps all three."""
    import torch

    params = SamplingParams(max_tokens=8)
    masks = torch.tensor([[-1, 5]], dtype=torch.int32)
    for workers_sample in (False, True):
        sender, receiver = StepDeltaSender(workers_sample=workers_sample), StepDeltaReceiver()
        out = SchedulerOutput([ScheduledSequence("a", [1], 12, [3, 4, 5, 6], params, True)],
                              grammar_bitmask=masks)
        out.before_sample = hook = lambda: None  # noqa: E731
        out.shape = shape = StepShape.of(out.scheduled)
        got, _ = _wire(sender, receiver, out)
        assert got.before_sample is None and out.before_sample is hook and out.grammar_bitmask is masks
        assert got.shape is None and out.shape is shape  # the engine's, on rank 0 only
        if workers_sample:
            assert torch.equal(got.grammar_bitmask, masks)
        else:
            assert got.grammar_bitmask is None
