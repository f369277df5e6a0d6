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

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def take(self, n: int) -> list[Block]:
        """n fresh blocks (ref 1), evicting cached content of the least recently freed ones."""
        assert n <= len(self.free_queue)
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                    if self.on_evict is not None:
                        self.on_evict(block.block_id, block.block_hash)
                block.block_hash = None
            block.ref_count = 1
            out.append(block)
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
        # block ids per sequence, kept beside the blocks so a step never rebuilds block tables
        self.seq_block_ids: dict[str, list[int]] = {}
        # how many of a sequence's leading blocks are registered in the prefix cache
        self.seq_num_registered: dict[str, int] = {}
        self.stats = PrefixCacheStats()
        self.offload: KVOffloadManager | None = None  # lower KV tiers (engine/kv_offload), when configured

    def attach_offload(self, offload: KVOffloadManager) -> None:
        """Evicted cached blocks go down to these tiers; prefix lookups and swaps use them."""
        self.offload = offload
        self.pool.on_evict = offload.on_gpu_evict

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
        n_full = seq.num_known_tokens // bs
        for i in range(len(seq.block_hashes), n_full):
            parent = seq.block_hashes[i - 1] if i else None
            seq.block_hashes.append(hash_block(parent, seq.token_ids_slice(i * bs, (i + 1) * bs)))

    # -- prefix cache ----------------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> list[Block]:
        """The longest run of cached blocks matching seq's leading full blocks.

        At least one token is always left to compute (its logits are needed), and sequences asking for
        prompt logprobs skip the cache (they need logits for every prompt position).
        """
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
        if self.offload is not None and len(hits) < max_blocks:
            hits += self._restore(seq.block_hashes[len(hits) : max_blocks], hits)
        return hits

    def _restore(self, block_hashes: list[bytes], gpu_hits: list[Block]) -> list[Block]:
        """Blocks of block_hashes found in the lower tiers, loaded into fresh GPU blocks that join the prefix
        cache (free, ref 0, like any cached block: allocate shares them; if it cannot, they stay cached).
        Leaves at least one free block beside them, and never evicts the GPU hits found before them."""
        found = self.offload.find(block_hashes)
        revived = sum(1 for b in gpu_hits if b.ref_count == 0)
        n = min(len(found), self.pool.num_free - revived - 1)
        if n <= 0:
            return []
        self.pool.share(gpu_hits)  # pinned while fresh blocks are taken (taking evicts the least recent)
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
        blocks = self.seq_blocks.get(seq.seq_id, [])
        num_computed = seq.num_computed_tokens + len(cached_prefix) * self.block_size
        need = (self.blocks_needed(num_computed + num_new_tokens + num_lookahead_tokens) - len(blocks)
                - len(cached_prefix))
        # a cached prefix block that sits in the free queue stops being free once shared
        revived = sum(1 for b in cached_prefix if b.ref_count == 0)
        if need > self.pool.num_free - revived:
            return False
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
            self._update_hashes(seq)
            n_full = min((num_computed + num_new_tokens) // self.block_size, len(seq.block_hashes))
            # from the first block not registered yet: a block whose last token was still pending (async
            # scheduling) when it filled up gets registered once that token is known
            start = self.seq_num_registered.get(seq.seq_id, 0)
            for i in range(start, n_full):
                self.pool.register(blocks[i], seq.block_hashes[i])
            self.seq_num_registered[seq.seq_id] = max(start, n_full)
        if self.offload is not None and seq.seq_id in self.offload.swapped:
            self.offload.swap_in(seq.seq_id, ids)  # a swapped-out sequence resumes: its KV comes back
        return True

    def allocate_unregistered(self, seq: Sequence, num_blocks: int) -> bool:
        """num_blocks fresh blocks for a sequence that has none, kept out of the prefix cache until its tokens
        count as computed (a KV transfer fills them first: disagg/). False, changing nothing, if there is no room."""
        if num_blocks > self.pool.num_free:
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

    def record_admission(self, seq: Sequence, num_hit_tokens: int) -> None:
        """Count an admission and its prefix-cache hit tokens in the stats."""
        if self.enable_prefix_caching and seq.params.prompt_logprobs is None:
            self.stats.queries += seq.num_tokens
            self.stats.hits += num_hit_tokens

    def swap_out(self, seq: Sequence, recompute_s: Callable[[], float]) -> bool:
        """Preemption by swap: copy seq's computed blocks to the CPU tier and release them, keeping its
        computed tokens; False (nothing changed) when offloading says recompute (mode, cost, or no room).
        recompute_s: the predicted time to recompute its tokens instead (asked only in auto mode)."""
        if self.offload is None:
            return False
        ids = self.seq_block_ids.get(seq.seq_id, [])[: self.blocks_needed(seq.num_computed_tokens)]
        if not self.offload.should_swap(len(ids), recompute_s) or not self.offload.swap_out(seq.seq_id, ids):
            return False
        self._release(seq)
        return True

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; its tail blocks are evicted first, keeping shared prefixes warm."""
        if self.offload is not None:
            self.offload.drop_swap(seq.seq_id)
        self._release(seq)

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
