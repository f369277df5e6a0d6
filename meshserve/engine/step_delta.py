"""What a worker rank already holds of each sequence is not sent to it again with every step.

Rank 0 pickles each step's SchedulerOutput and broadcasts it; every other rank unpickles it before it can
prepare the step. Most of that is the same each step: a request's SamplingParams (~25 fields) and its block
table (a decode at 1,024 tokens has 64 blocks and adds one every 16 steps). At 256 sequences they were ~80% of
the bytes and ~75% of the unpickling (2.2 -> 0.6 ms per step on the 2-core development machine), paid per
step on both ends: on rank 0 before the first stage can launch, on the last stage before it can sample. With
pipeline parallel that host time is what each step must stay under.

So rank 0 sends a sequence's params only when they are new to the workers, and of its block table only the
blocks after those the workers hold (ScheduledSequence.num_held_blocks says how many to keep). Both ends apply
a step in the same order and drop a sequence when its id is in finished_seq_ids (which every rank sees before
that step's sequences), so what rank 0 believes the workers hold is what they hold. A changed table (recompute
after preemption, rejected proposals trimmed) is compared against the copy sent and resent from its first
differing block; new params (a reused request id) are sent whole.

Nor is what only rank 0 reads: the engine's before_sample hook (a callable of the engine core) never leaves,
and with one pipeline stage neither do the grammar masks: rank 0 is the only rank that samples (step_sampler.py),
so the workers never read them, and rank 0 fills them once its own forward is queued
(EngineCore._late_masks_hook), after the step went out. With several stages the last stage samples and gets
the masks with the step ([B, vocab / 32] int32: ~0.4 MB a step at B = 64 and a 49k vocabulary).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from meshserve.engine.scheduler_output import SchedulerOutput
from meshserve.sampling import SamplingParams


class StepDeltaSender:
    """Rank 0's side: strips from a step what the workers hold or never read, for the broadcast only.
    workers_sample: whether a worker rank samples (the last pipeline stage's): the grammar masks go along."""

    def __init__(self, workers_sample: bool = False):
        self.workers_sample = workers_sample
        self._params: dict[str, SamplingParams] = {}  # the params object each sequence's were sent from
        self._tables: dict[str, list[int]] = {}  # a copy of the block table each sequence last sent

    @contextlib.contextmanager
    def stripped(self, out: SchedulerOutput) -> Iterator[SchedulerOutput]:
        """out as the workers need it while inside (pickle it there); restored on exit, for rank 0's runner.
        The block tables are the block manager's live lists: they are replaced, never changed."""
        for seq_id in out.finished_seq_ids:
            self._params.pop(seq_id, None)
            self._tables.pop(seq_id, None)
        saved = []
        for e in out.scheduled:
            params, table = e.params, e.block_table
            saved.append((params, table))
            if self._params.get(e.seq_id) is params:
                e.params = None
            else:
                self._params[e.seq_id] = params
            sent = self._tables.get(e.seq_id)
            held = _common_prefix(sent, table) if sent is not None else 0
            if held:
                e.block_table, e.num_held_blocks = table[held:], held
            if sent is None or held < len(sent) or len(table) > held:
                self._tables[e.seq_id] = table.copy()
        hook, masks, shape = out.before_sample, out.grammar_bitmask, out.shape
        out.before_sample = out.shape = None
        if not self.workers_sample:
            out.grammar_bitmask = None
        try:
            yield out
        finally:
            for e, (params, table) in zip(out.scheduled, saved):
                e.params, e.block_table, e.num_held_blocks = params, table, 0
            out.before_sample, out.grammar_bitmask, out.shape = hook, masks, shape


class StepDeltaReceiver:
    """A worker's side: puts back what rank 0 stripped, from what earlier steps sent."""

    def __init__(self):
        self._params: dict[str, SamplingParams | None] = {}
        self._tables: dict[str, list[int]] = {}

    def restore(self, out: SchedulerOutput) -> SchedulerOutput:
        for seq_id in out.finished_seq_ids:
            self._params.pop(seq_id, None)
            self._tables.pop(seq_id, None)
        for e in out.scheduled:
            if e.params is None:
                e.params = self._params.get(e.seq_id)
            else:
                self._params[e.seq_id] = e.params
            if e.num_held_blocks:
                e.block_table = self._tables[e.seq_id][: e.num_held_blocks] + e.block_table
                e.num_held_blocks = 0
            self._tables[e.seq_id] = e.block_table
        return out


def _common_prefix(sent: list[int], table: list[int]) -> int:
    """How many leading blocks table shares with sent (all of sent, in the common case of a growing table)."""
    n = len(sent)
    if n <= len(table) and table[:n] == sent:
        return n
    n = min(n, len(table))
    i = 0
    while i < n and sent[i] == table[i]:
        i += 1
    return i
