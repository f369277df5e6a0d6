"""Light stand-ins for the engine's bookkeeping, for simulated sequences whose token ids never matter.

The simulator only needs lengths: which tokens exist, how many are computed, how many KV blocks they hold.
Without prefix caching (no hashes to compute) the real Scheduler runs unchanged on
- SimSequence: a Sequence whose prompt and output are counts (no per-token lists); token_ids_slice returns a
  range of the right length (the ids are never read);
- CountingBlockManager: the BlockManager's arithmetic without Block objects (a pool of 30,000 blocks per
  replica x 100 replicas is 3 M objects to build). Without prefix caching which block goes where never
  changes a decision: only how many are free, and how many each sequence holds;
- LightScheduler: the Scheduler with these, whose step output lists LightEntry records (what a model runner
  would need, token ids and block tables, is never read). schedule(), update_after_step() and the policy are
  the Scheduler's own.
tests/simulator/test_replica.py checks a run with these gives the same report as one with the real ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from meshserve.config import CacheConfig, SchedulerConfig
from meshserve.engine.block_manager import PrefixCacheStats
from meshserve.engine.scheduler import Scheduler
from meshserve.engine.sequence import Sequence


class TokenCount:
    """Stands in for a token list: its length, and append/extend that only count."""

    __slots__ = ("n",)

    def __init__(self, n: int = 0):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def append(self, _token: int) -> None:
        self.n += 1

    def extend(self, tokens) -> None:
        self.n += len(tokens)


class SimSequence(Sequence):
    """A Sequence of `prompt_len` prompt tokens whose ids are never looked at (build it with make())."""

    @classmethod
    def make(cls, seq_id: str, prompt_len: int, params, max_tokens: int, arrival_time: float) -> SimSequence:
        return cls(seq_id=seq_id, request_id=seq_id, index=0, prompt_token_ids=TokenCount(prompt_len),
                   params=params, max_tokens=max_tokens, arrival_time=arrival_time, output_token_ids=TokenCount())

    @property
    def all_token_ids(self) -> list[int]:
        raise TypeError("a SimSequence holds token counts, not ids")

    @property
    def num_tokens(self) -> int:
        return self.prompt_token_ids.n + self.output_token_ids.n + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        return self.prompt_token_ids.n + self.output_token_ids.n

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt_token_ids.n

    @property
    def num_output_tokens(self) -> int:
        return self.output_token_ids.n

    def token_ids_slice(self, start: int, end: int) -> range:
        return range(start, end)  # only its length is read


class CountingBlockManager:
    """BlockManager without prefix caching, kept as counts: the same allocate/free decisions (allocate makes
    all the room asked for or changes nothing; blocks_needed rounds up), no Block objects. block_table is a
    range as long as the sequence's table."""

    enable_prefix_caching = False
    offload = None

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_free_blocks = num_blocks
        self.held: dict[str, int] = {}
        self.stats = PrefixCacheStats()  # no queries without prefix caching

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # no KV offload tiers here: no block is ever in flight to a lower tier
    num_landing_blocks = 0

    def poll_offload(self) -> list[str]:
        return []

    def block_table(self, seq: Sequence) -> range:
        return range(self.held.get(seq.seq_id, 0))

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: Sequence) -> list:
        return []

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_prefix: list | None = None,
                 num_lookahead_tokens: int = 0) -> bool:
        held = self.held.get(seq.seq_id, 0)
        need = -(-(seq.num_computed_tokens + num_new_tokens + num_lookahead_tokens) // self.block_size) - held
        if need > self.num_free_blocks:
            return False
        if need > 0:
            self.num_free_blocks -= need
            held += need
        self.held[seq.seq_id] = held
        return True

    def trim(self, seq: Sequence, num_tokens: int) -> int:
        held, keep = self.held.get(seq.seq_id, 0), self.blocks_needed(num_tokens)
        if held <= keep:
            return 0
        self.held[seq.seq_id] = keep
        self.num_free_blocks += held - keep
        return held - keep

    def record_admission(self, seq: Sequence, num_hit_tokens: int) -> None:
        pass  # prefix-cache statistics only

    def swap_out(self, seq: Sequence, recompute_s: Callable[[], float]) -> bool:
        return False  # no KV offload tier: preemption recomputes

    def free(self, seq: Sequence) -> None:
        self.num_free_blocks += self.held.pop(seq.seq_id, 0)

    def reset_prefix_cache(self) -> bool:
        return True


class LightEntry:
    """A ScheduledSequence's fields the simulator and update_after_step read (greedy, no speculation)."""

    __slots__ = ("do_sample", "num_computed_tokens", "num_new_tokens", "seq_id")
    num_spec_tokens = 0

    def __init__(self, seq_id: str, num_computed_tokens: int, num_new_tokens: int, do_sample: bool):
        self.seq_id = seq_id
        self.num_computed_tokens = num_computed_tokens
        self.num_new_tokens = num_new_tokens
        self.do_sample = do_sample


class LightScheduler(Scheduler):
    """The Scheduler over SimSequences and a CountingBlockManager (no prefix caching), listing LightEntry
    records. Only for sequences without speculation, penalties or prompt logprobs (the simulator's)."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig):
        if cache_config.enable_prefix_caching:
            raise ValueError("LightScheduler counts blocks: prefix caching needs the real BlockManager")
        super().__init__(scheduler_config, replace(cache_config, num_blocks=0))
        self.block_manager = CountingBlockManager(cache_config.num_blocks, cache_config.block_size)

    def _entry(self, seq: Sequence, num_new: int) -> LightEntry:
        start = seq.num_computed_tokens
        return LightEntry(seq.seq_id, start, num_new, start + num_new >= seq.num_tokens)
