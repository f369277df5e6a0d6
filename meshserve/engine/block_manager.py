"""Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables, automatic prefix caching.

A full block is identified by a hash chain, hash(parent block's hash, its token ids), so two sequences
with the same leading tokens map to the same blocks. Blocks are shared through reference counts; a block
whose count drops to zero goes to the free queue but keeps its hash, so a later request with the same
prefix can revive it, until the pool needs it for something else (least recently freed first).

This module only does bookkeeping with block ids; the model runner owns the memory they index.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from meshserve.engine.sequence import Sequence

if TYPE_CHECKING:
    from meshserve.engine.kv_offload.manager import KVOffloadManager


def hash_block(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    """Hash of a full block given its parent's hash; stable across processes (routers may reuse it)."""
    h = hashlib.blake2b(digest_size=16)
    if parent_hash is not None:
        h.update(parent_hash)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


def salt_hash(cache_salt: str | None) -> bytes | None:
    """The first block's parent under a request's cache_salt (vLLM's field): salted prompts share cached blocks
    only with prompts of the same salt; None (unsalted) leaves the hashes as they were."""
    if cache_salt is None:
        return None
    return hashlib.blake2b(b"cache_salt\0" + cache_salt.encode(), digest_size=16).digest()


def hash_blocks(parent_hash: bytes | None, token_ids: list[int], block_size: int) -> list[bytes]:
    """hash_block over each full block of token_ids in turn, each block's parent the one before (the first's:
    parent_hash): the same hashes, from one int64 buffer of all the tokens rather than one conversion per block
    (a 512-token prompt's 32 blocks: ~24 us instead of ~43 here). Fewer than block_size tokens left at the end
    are not hashed."""
    data = memoryview(np.asarray(token_ids, dtype=np.int64).tobytes())
    step = 8 * block_size
    h = parent_hash or b""  # hashing b"" first is hashing nothing: hash_block's None
    out = []
    for start in range(0, len(data) - step + 1, step):
        h = hashlib.blake2b(h + data[start : start + step], digest_size=16).digest()
        out.append(h)
    return out


@dataclass(eq=False)
class Block:
    """One KV block's bookkeeping: its id in the pool, how many sequences hold it, and its hash once full
    and registered in the prefix cache."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


@dataclass
class PrefixCacheStats:
    """Counted in tokens, over admissions (queries) of sequences that may use the cache."""

    queries: int = 0
    hits: int = 0
    restored: int = 0  # of hits: tokens restored from a KV offload tier (vLLM counts them as external)
    # vLLM's external prefix cache: tokens looked up past the GPU cache (offload tiers; a disaggregated prefill's
    # transfer) and those found there
    external_queries: int = 0
    external_hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockPool:
    """All blocks, the free queue in eviction order (LRU) and the hash -> cached block table."""

    def __init__(self, num_blocks: int):
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[bytes, Block] = {}
        # told (block id, hash) before a cached block's content is overwritten (KV offload copies it down)
        self.on_evict: Callable[[int, bytes], None] | None = None
        # KV offload: asked (block id, hash) to copy a cached block down before it is reused; True when the
        # copy is queued (the block is then in flight until `land`: never taken, so never written, meanwhile)
        self.start_store: Callable[[int, bytes], bool] | None = None
        self.in_flight: set[int] = set()
        self.stored: set[int] = set()  # blocks whose content was copied down: reusable without another store

    @property
    def num_free(self) -> int:
        """Blocks that can be taken now (free blocks in flight come later)."""
        return len(self.free_queue) - self.num_landing if self.in_flight else len(self.free_queue)

    @property
    def num_landing(self) -> int:
        """Free blocks in flight: takeable once their stores finish."""
        return sum(1 for b in self.in_flight if self.blocks[b].ref_count == 0)

    def make_clean(self, n: int, skip: set[int] | frozenset = frozenset()) -> int:
        """Walk the free queue in eviction order until n blocks can be taken without losing content (skip: blocks
        about to be shared); a cached block not copied down yet starts its store and is passed over while in
        flight. Returns how many takeable blocks were found (at most n)."""
        if self.start_store is None:
            return n
        found = 0
        for block in self.free_queue.values():
            if found >= n:
                break
            if block.block_id in self.in_flight or block.block_id in skip:
                continue
            h = block.block_hash
            if (h is not None and block.block_id not in self.stored and self.cached.get(h) is block
                    and self.start_store(block.block_id, h)):
                self.in_flight.add(block.block_id)
                continue
            found += 1
        return found

    def land(self, block_ids: list[int]) -> None:
        """Stores of these blocks finished, or failed: writable again, and never stored again while they hold
        this content (a failed one is given up on, not retried: a retry could fail forever)."""
        self.in_flight.difference_update(block_ids)
        self.stored.update(b for b in block_ids if self.blocks[b].block_hash is not None)

    def take(self, n: int) -> list[Block]:
        """n fresh blocks (ref 1), evicting cached content of the least recently freed ones; blocks in flight
        are passed over (with offloading, make_clean(n) first: it keeps their content)."""
        assert n <= self.num_free
        out, passed = [], []
        while len(out) < n:
            _, block = self.free_queue.popitem(last=False)
            if block.block_id in self.in_flight:
                passed.append(block)
                continue
            self.stored.discard(block.block_id)
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                    if self.on_evict is not None:
                        self.on_evict(block.block_id, block.block_hash)
                block.block_hash = None
            block.ref_count = 1
            out.append(block)
        for block in reversed(passed):  # back at the head, in their order
            self.free_queue[block.block_id] = block
            self.free_queue.move_to_end(block.block_id, last=False)
        return out

    def share(self, blocks: list[Block]) -> None:
        """Add a reference to cached blocks (a prefix hit), pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def release(self, blocks: list[Block]) -> None:
        """Drop a reference; blocks reaching zero join the free queue in the given (eviction) order."""
        for block in blocks:
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block.block_id} freed twice"
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block

    def register(self, block: Block, block_hash: bytes) -> None:
        """Make a full block findable by its hash (the first holder of a hash keeps it)."""
        if block.block_hash is None:
            block.block_hash = block_hash
            self.cached.setdefault(block_hash, block)


class BlockManager:
    """Allocates KV blocks to sequences as their computed tokens grow, and finds prefix-cache hits.

    Holds the block pool and, per sequence, its blocks, their ids (the block table the runner reads) and how
    many of them are registered in the prefix cache. Promises: allocate either makes all the room asked for
    or changes nothing; a block is reused for another sequence only when no sequence holds it; block ids
    index the runner's KV pool (kv_pool.py) and are the same on every rank.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.seq_blocks: dict[str, list[Block]] = {}
        self.num_retired_blocks = 0  # taken out of use for good (retire): a transfer may still write them
        # block ids per sequence, kept beside the blocks so a step never rebuilds block tables
        self.seq_block_ids: dict[str, list[int]] = {}
        # how many of a sequence's leading blocks are registered in the prefix cache
        self.seq_num_registered: dict[str, int] = {}
        self.stats = PrefixCacheStats()
        self._last_lookup: tuple[Sequence, int, int] | None = None  # find_cached_prefix's, for record_admission
        self.offload: KVOffloadManager | None = None  # lower KV tiers (engine/kv_offload), when configured
        # offloading: free blocks next in eviction order whose stores start each step, so the next steps' takes
        # find them already copied down (the scheduler sizes it to a step's worth of blocks)
        self.store_ahead_blocks = 0
        # offloading: blocks registered this step (filled by its forward): written through to the CPU tier after
        # it, so the GPU pool's cached blocks are mostly copied down before anything needs their room
        self.filled: list[Block] = []
        # offloading: the predicted device time to prefill a sequence's tokens start..end-1 with the ones before
        # cached (the scheduler's step-time model; None: no model, restores from disk always); a run of disk
        # blocks is restored only when reading it is predicted faster
        self.prefill_range_s: Callable[[int, int], float | None] | None = None

    def attach_offload(self, offload: KVOffloadManager) -> None:
        """Evicted cached blocks go down to these tiers; prefix lookups and swaps use them."""
        self.offload = offload
        self.pool.start_store = offload.on_gpu_evict
        self.pool.on_evict = offload.on_gpu_dropped
        offload.on_lost = self._copy_below_lost

    def _copy_below_lost(self, block_hash: bytes) -> None:
        """No tier below keeps block_hash any more: a cached GPU block with that content is stored again before
        it is reused (it was marked stored when its write-through landed)."""
        block = self.pool.cached.get(block_hash)
        if block is not None:
            self.pool.stored.discard(block.block_id)

    def poll_offload(self) -> list[str]:
        """Each step first: blocks whose stores finished can be taken again. Returns the swapped-out sequences
        whose KV was lost to a failed store (they must recompute)."""
        if self.offload is None:
            return []
        landed, failed, lost = self.offload.poll()
        self.pool.land(landed + failed)
        return lost

    @property
    def num_landing_blocks(self) -> int:
        """Free blocks whose stores are still running: allocatable in a step or so (wait rather than preempt)."""
        return self.pool.num_landing

    def take_step_transfers(self) -> tuple[list, list]:
        """The step's copies between KV tiers: (before its forward: loads, and the stores ahead of eviction
        started here; after its forward: the write-through of the blocks it fills)."""
        for block in self.filled:
            h = block.block_hash
            if h is not None and self.pool.cached.get(h) is block and block.block_id not in self.pool.in_flight:
                if self.offload.on_gpu_evict(block.block_id, h, after_forward=True):
                    self.pool.in_flight.add(block.block_id)
        self.filled = []
        self.pool.make_clean(self.store_ahead_blocks)
        return self.offload.take_step_transfers()

    def take_transfers(self) -> list:
        """All of the step's copies in one list (for callers that run them at once, after the forward)."""
        before, after = self.take_step_transfers()
        return before + after

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (cached free blocks count as free)."""
        return 1.0 - self.pool.num_free / self.num_blocks

    def block_table(self, seq: Sequence) -> list[int]:
        """The sequence's block ids (a live list: copy it to keep a snapshot)."""
        return self.seq_block_ids.get(seq.seq_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, seq: Sequence) -> None:
        """Extend seq.block_hashes to cover every full block of its known tokens (not pending ones)."""
        bs = self.block_size
        n_full, have = seq.num_known_tokens // bs, len(seq.block_hashes)
        if n_full > have:  # a whole prompt's blocks in one call (hash_blocks), not one hash_block each
            parent = seq.block_hashes[-1] if have else salt_hash(seq.params.cache_salt)
            seq.block_hashes += hash_blocks(parent, seq.token_ids_slice(have * bs, n_full * bs), bs)

    # -- prefix cache ----------------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> list[Block] | None:
        """The longest run of cached blocks matching seq's leading full blocks; None while more of it is being
        read from the disk tier (the sequence waits for it: a later step finds it in the CPU tier).

        At least one token is always left to compute (its logits are needed), and sequences asking for
        prompt logprobs skip the cache (they need logits for every prompt position).
        """
        self._last_lookup = None
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        self._update_hashes(seq)
        max_blocks = (seq.num_known_tokens - 1) // self.block_size
        hits = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block = self.pool.cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        if self.offload is not None:
            on_gpu = len(hits)
            if on_gpu < max_blocks:
                restored = self._restore(seq.block_hashes[on_gpu:max_blocks], hits)
                if restored is None:
                    return None
                hits += restored
            # for the stats, should seq be admitted with these: tokens asked of the tiers, tokens they gave
            self._last_lookup = (seq, seq.num_tokens - on_gpu * self.block_size,
                                 (len(hits) - on_gpu) * self.block_size)
        return hits

    def _register_full(self, seq: Sequence, blocks: list[Block], num_tokens: int) -> None:
        """Register in the prefix cache seq's blocks that are full once its first num_tokens are computed."""
        start = self.seq_num_registered.get(seq.seq_id)
        if start is not None and num_tokens // self.block_size <= start:
            return  # no block past the registered ones is full (most steps of a decode); hashes are extended lazily
        self._update_hashes(seq)
        n_full = min(num_tokens // self.block_size, len(seq.block_hashes))
        # from the first block not registered yet: a block whose last token was still pending (async
        # scheduling) when it filled up gets registered once that token is known
        start = start or 0
        for i in range(start, n_full):
            if self.offload is not None and blocks[i].block_hash is None:
                self.filled.append(blocks[i])
            self.pool.register(blocks[i], seq.block_hashes[i])
        self.seq_num_registered[seq.seq_id] = max(start, n_full)

    def _restore(self, block_hashes: list[bytes], gpu_hits: list[Block]) -> list[Block] | None:
        """Blocks of block_hashes found in the lower tiers, loaded into fresh GPU blocks that join the prefix
        cache (free, ref 0, like any cached block: allocate shares them; if it cannot, they stay cached).
        Leaves at least one free block beside them, and never evicts the GPU hits found before them.
        None: part of the run is still being read from disk."""
        first = len(gpu_hits) * self.block_size  # the run's first token
        recompute_s = None
        if self.prefill_range_s is not None:
            def recompute_s(i: int, j: int) -> float | None:
                return self.prefill_range_s(first + i * self.block_size, first + j * self.block_size)
        found, reading = self.offload.find(block_hashes, recompute_s)
        if reading:
            return None
        revived = sum(1 for b in gpu_hits if b.ref_count == 0)
        n = min(len(found), self.pool.num_free - revived - 1)
        if n <= 0:
            return []
        self.pool.share(gpu_hits)  # pinned while fresh blocks are taken (taking evicts the least recent)
        n = self.pool.make_clean(n)
        fresh = self.pool.take(n)
        self.pool.release(list(reversed(gpu_hits)))
        for block, (block_hash, _, _) in zip(fresh, found):
            self.pool.register(block, block_hash)
        self.offload.load(found[:n], [b.block_id for b in fresh])
        self.pool.release(fresh)
        return fresh

    # -- allocation ------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int, cached_prefix: list[Block] | None = None,
                 num_lookahead_tokens: int = 0) -> bool:
        """Make room for num_new_tokens more computed tokens of seq (after its cached prefix, if any), and
        num_lookahead_tokens slots past them (a draft model's proposals; never registered in the cache).

        Returns False, changing nothing, when the pool cannot provide the blocks. Blocks that will be
        full once this step's tokens are written get registered in the prefix cache right away: within a
        step every layer writes all new K/V before any attention reads, so a sequence admitted later in
        the same step may already share them (this is how n > 1 samples share one prompt).
        """
        cached_prefix = cached_prefix or []
        seq_id = seq.seq_id
        blocks = self.seq_blocks.get(seq_id)
        num_computed = seq.num_computed_tokens + len(cached_prefix) * self.block_size
        need = (-(-(num_computed + num_new_tokens + num_lookahead_tokens) // self.block_size)  # blocks_needed
                - (len(blocks) if blocks is not None else 0) - len(cached_prefix))
        if blocks is not None and not cached_prefix and need <= 0 and self.offload is None:
            # a running sequence whose blocks already hold this step's tokens (most decodes, every step): nothing
            # to take or share, the pool cannot refuse; only full blocks to register
            if self.enable_prefix_caching:
                self._register_full(seq, blocks, num_computed + num_new_tokens)
            return True
        blocks = blocks if blocks is not None else []
        # a cached prefix block that sits in the free queue stops being free once shared
        revived = sum(1 for b in cached_prefix if b.ref_count == 0)
        if need > self.pool.num_free - revived:
            return False
        if self.offload is not None:
            if seq.seq_id in self.offload.swapped and not self.offload.swap_landed(seq.seq_id):
                return False  # its swap-out is still being copied: it resumes once that is done
            skip = {b.block_id for b in cached_prefix if b.ref_count == 0}
            if need > 0 and self.pool.make_clean(need, skip) < need:
                return False  # the stores started to make room finish in a step or so
        ids = self.seq_block_ids.setdefault(seq.seq_id, [])
        if cached_prefix:
            self.pool.share(cached_prefix)
            blocks = blocks + cached_prefix
            ids.extend(b.block_id for b in cached_prefix)
        if need > 0:
            new = self.pool.take(need)
            blocks = blocks + new
            ids.extend(b.block_id for b in new)
        self.seq_blocks[seq.seq_id] = blocks
        if self.enable_prefix_caching:
            self._register_full(seq, blocks, num_computed + num_new_tokens)
        if self.offload is not None and seq.seq_id in self.offload.swapped:
            self.offload.swap_in(seq.seq_id, ids)  # a swapped-out sequence resumes: its KV comes back
        return True

    def allocate_unregistered(self, seq: Sequence, num_blocks: int) -> bool:
        """num_blocks fresh blocks for a sequence that has none, kept out of the prefix cache until its tokens
        count as computed (a KV transfer fills them first: disagg/). False, changing nothing, if there is no room."""
        if num_blocks > self.pool.num_free or self.pool.make_clean(num_blocks) < num_blocks:
            return False
        blocks = self.pool.take(num_blocks)
        self.seq_blocks[seq.seq_id] = blocks
        self.seq_block_ids[seq.seq_id] = [b.block_id for b in blocks]
        return True

    def detach(self, seq: Sequence) -> list[Block]:
        """Take seq's blocks from it without releasing them (a KV transfer holds them until release_blocks)."""
        if self.offload is not None:
            self.offload.drop_swap(seq.seq_id)
        self.seq_block_ids.pop(seq.seq_id, None)
        self.seq_num_registered.pop(seq.seq_id, None)
        return self.seq_blocks.pop(seq.seq_id, [])

    def release_blocks(self, blocks: list[Block]) -> None:
        """Release detached blocks (tail first into the eviction order, like free)."""
        self.pool.release(list(reversed(blocks)))

    def trim(self, seq: Sequence, num_tokens: int) -> int:
        """Roll back to the blocks holding seq's first num_tokens tokens (rejected proposals' KV): blocks
        past them return to the pool. Registered blocks hold verified tokens only, so none is dropped.
        Returns how many blocks were freed."""
        blocks = self.seq_blocks.get(seq.seq_id)
        keep = self.blocks_needed(num_tokens)
        if not blocks or len(blocks) <= keep:
            return 0
        assert keep >= self.seq_num_registered.get(seq.seq_id, 0), "trimming a registered block"
        dropped = blocks[keep:]
        self.seq_blocks[seq.seq_id] = blocks[:keep]
        del self.seq_block_ids[seq.seq_id][keep:]
        self.pool.release(list(reversed(dropped)))
        return len(dropped)

    def trim_swapped(self, seq: Sequence, num_tokens: int) -> None:
        """trim for a swapped-out sequence: its CPU copies past the blocks of its first num_tokens tokens go."""
        if self.offload is not None:
            self.offload.trim_swap(seq.seq_id, self.blocks_needed(num_tokens))

    def record_admission(self, seq: Sequence, num_hit_tokens: int) -> None:
        """Count an admission and its prefix-cache hit tokens in the stats (those restored from an offload tier,
        found by the lookup that admitted it, also as external ones, and in seq.num_external_cached_tokens)."""
        lookup = self._last_lookup
        _, asked, restored = lookup if lookup is not None and lookup[0] is seq else (None, 0, 0)
        seq.num_external_cached_tokens = restored
        if self.enable_prefix_caching and seq.params.prompt_logprobs is None:
            self.stats.queries += seq.num_tokens
            self.stats.hits += num_hit_tokens
            self.stats.restored += restored
            self.stats.external_queries += asked
            self.stats.external_hits += restored

    def record_transfer(self, seq: Sequence) -> None:
        """A disaggregated decode leg's prompt arrived whole from its prefill: external prefix-cache tokens."""
        seq.num_external_cached_tokens = seq.num_prompt_tokens
        self.stats.external_queries += seq.num_prompt_tokens
        self.stats.external_hits += seq.num_prompt_tokens

    def swap_out(self, seq: Sequence, recompute_s: Callable[[], float]) -> bool:
        """Preemption by swap: copy seq's computed blocks to the CPU tier and release them, keeping its
        computed tokens; False (nothing changed) when offloading says recompute (mode, cost, or no room).
        recompute_s: the predicted time to recompute its tokens instead (asked only in auto mode)."""
        if self.offload is None:
            return False
        ids = self.seq_block_ids.get(seq.seq_id, [])[: self.blocks_needed(seq.num_computed_tokens)]
        if not self.offload.should_swap(len(ids), recompute_s) or not self.offload.swap_out(seq.seq_id, ids):
            return False
        self.pool.in_flight.update(ids)  # released now, written again only once their stores finished
        self._release(seq)
        return True

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; its tail blocks are evicted first, keeping shared prefixes warm."""
        if self.offload is not None:
            self.offload.drop_swap(seq.seq_id)
        self._release(seq)

    def retire(self, seq: Sequence) -> None:
        """Take seq's blocks out of use for good: something outside the engine may still write into them (a
        KV transfer the transport could not cancel). Its blocks it alone holds are never handed out again and
        no longer findable by hash; blocks it shares (prefix hits) are only released."""
        blocks = self.seq_blocks.get(seq.seq_id) or []
        shared = [b for b in blocks if b.ref_count > 1]
        for block in blocks:
            if block.ref_count == 1 and block.block_hash is not None:
                if self.pool.cached.get(block.block_hash) is block:
                    del self.pool.cached[block.block_hash]
                block.block_hash = None
        self.seq_block_ids.pop(seq.seq_id, None)
        self.seq_num_registered.pop(seq.seq_id, None)
        self.seq_blocks.pop(seq.seq_id, None)
        self.pool.release(shared)
        self.num_retired_blocks += len(blocks) - len(shared)

    def _release(self, seq: Sequence) -> None:
        self.seq_block_ids.pop(seq.seq_id, None)
        self.seq_num_registered.pop(seq.seq_id, None)
        blocks = self.seq_blocks.pop(seq.seq_id, None)
        if blocks:
            self.pool.release(list(reversed(blocks)))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (only possible when no sequence holds blocks)."""
        if self.seq_blocks:
            return False
        for block in self.pool.blocks:
            block.block_hash = None
        self.pool.cached.clear()
        return True
