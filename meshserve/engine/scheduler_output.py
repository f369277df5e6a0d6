"""The typed decision of one scheduler step, consumed by the model runner(s).

It is plain data (picklable) so it can be broadcast to worker processes when the model is split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshserve.sampling import SamplingParams


@dataclass
class ScheduledSequence:
    """One sequence's share of the step: tokens [num_computed_tokens, num_computed_tokens + len(token_ids)).

    token_ids may hold -1 for a token sampled by the previous step and not yet read back (async
    scheduling): the runner fills it in on the device. block_table covers every token up to the end of
    this chunk.
    """

    seq_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    params: SamplingParams
    # True when this chunk reaches the end of the known tokens, so a new token is sampled after it
    do_sample: bool
    # full history, only filled when the sampler needs it (penalties)
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # speculative decoding: the last num_spec_tokens of token_ids are proposals; the runner scores every
    # position from the last verified token on and verifies them (do_sample is then True)
    num_spec_tokens: int = 0
    # async scheduling: proposals of this sequence's step still in flight when this one was scheduled. The
    # chunk is placed as if all were accepted; the runner moves it back by the rejected ones on the device
    num_unverified_tokens: int = 0
    # on the way to a worker rank only: block_table holds the blocks after the first num_held_blocks, which
    # the worker kept from an earlier step (engine/step_delta.py); 0 everywhere else
    num_held_blocks: int = 0

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


def sampling_indices(scheduled: list[ScheduledSequence]) -> list[int]:
    """The rows that sample one token this step, in the sampler's order (rows verifying proposals apart)."""
    return [i for i, s in enumerate(scheduled) if s.do_sample and not s.num_spec_tokens]


@dataclass
class SchedulerOutput:
    """The whole step: the sequences to run (prefill chunks and decodes, in batch order), and the ids of
    sequences preempted or finished since the last step (runners drop a finished sequence's state)."""

    scheduled: list[ScheduledSequence]
    preempted_seq_ids: list[str] = field(default_factory=list)
    finished_seq_ids: list[str] = field(default_factory=list)  # since the last step: runners drop their state
    # KV offload copies the runner makes before the forward, in order: ("store", gpu block, cpu slot) or
    # ("load", cpu slot, gpu block) (engine/kv_offload/manager.py)
    kv_transfers: list[tuple[str, int, int]] = field(default_factory=list)
    # KV offload stores the runner queues after the forward: the blocks this step fills, written through to the
    # CPU tier while the next steps run, so a later eviction finds them copied down already
    kv_stores_after_forward: list[tuple[str, int, int]] = field(default_factory=list)
    # rank 0's runner only (never sent to workers: step_delta.py): the engine's hook that fills the grammar
    # masks, called once the forward is queued, so the CPU fills them while the device runs it
    before_sample: Any = field(default=None, repr=False, compare=False)
    # structured outputs: the tokens each sampling row may take ([len(sampling_indices(scheduled)), words]
    # int32 packed bitmask on the host, row k for the k-th sampling row; all ones for an unconstrained row),
    # None when no row is constrained. Filled by the engine (before_sample, or before the step is sent)
    grammar_bitmask: Any = None
    # the step's StepShape, computed once by the scheduler (its TPOT credit) and read again by the engine (the
    # step-time model, the trace); rank 0 only (step_delta.py strips it)
    shape: Any = field(default=None, repr=False, compare=False)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
