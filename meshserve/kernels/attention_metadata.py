"""The per-step description of the flat token batch that attention backends read.

It lives beside the kernels because it is their contract: the engine builds it, the attention backends
(Triton and the torch reference) read it.
"""

import itertools
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's new tokens sit in the flat batch and where its KV lives in the paged cache.

    The batch holds B sequences; sequence i contributes query_lens[i] new tokens (a prefill chunk, or 1 for
    decode) at flat positions query_start_loc[i]:query_start_loc[i+1], and after this step its context
    holds seq_lens[i] tokens (cached prefix + new ones).
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block_id * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B+1] int64 cumulative query lengths
    seq_lens: torch.Tensor  # [B] int64 context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    max_query_len: int
    max_seq_len: int
    # host copies, so the reference path and the scheduler never sync on the device
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # a captured mixed-step graph's metadata (engine/mixed_graph.py): max_query_len is the bucket's token
    # count T, max_seq_len is max_model_len, trailing sequences have q_len 0 and seq_len 0, trailing tokens
    # belong to no sequence; the host lists are not the replayed batch's. A backend sizes its launch from
    # shapes alone and reads lengths on the device.
    graph_bound: bool = False
    # new tokens of each sequence (host): the split of a mixed step into decode rows and prefill chunks that
    # the Triton backend (num_single_query_seqs) and the MLA layer (absorbed vs expanded rows) both read.
    # The step builder passes the counts it has; left None, they come from query_start_loc_cpu, once.
    query_lens_cpu: list[int] | None = None

    def __post_init__(self):
        if self.query_lens_cpu is None:
            self.query_lens_cpu = [b - a for a, b in itertools.pairwise(self.query_start_loc_cpu)]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @cached_property
    def num_single_query_seqs(self) -> int:
        """Sequences with exactly one new token (decode rows, or a one-token chunk), from the host lists;
        counted once per step, not per layer (a graph's host lists are placeholders: never ask them)."""
        return self.query_lens_cpu.count(1)

    @cached_property
    def step_memo(self) -> dict:
        """Values derived from this step's metadata that every layer would build alike (an MLA step's decode
        rows, its prefill context slots), keyed by their builder: built by the first layer, shared by the rest.
        Not a dataclass field: dataclasses.replace gives the new metadata an empty one."""
        return {}
