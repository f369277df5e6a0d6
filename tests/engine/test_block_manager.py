"""BlockManager / BlockPool: hash chain, paged allocation, prefix caching, LRU eviction, stats."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from meshserve.engine.block_manager import BlockManager, hash_block, hash_blocks
from meshserve.engine.sequence import Sequence
from meshserve.sampling import SamplingParams

BS = 4


def make_seq(seq_id: str, prompt, max_tokens: int = 8, **params) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=seq_id, index=0, prompt_token_ids=list(prompt),
                    params=SamplingParams(max_tokens=max_tokens, **params), max_tokens=max_tokens)


def compute(bm: BlockManager, seq: Sequence, n: int, use_cache: bool = False) -> list:
    """What the scheduler does for one step of seq: (maybe) find a prefix hit, allocate, advance."""
    hits = bm.find_cached_prefix(seq) if use_cache else []
    assert bm.allocate(seq, n, hits)
    seq.num_computed_tokens += len(hits) * BS + n
    return hits


def run_prompt(bm: BlockManager, seq: Sequence) -> None:
    """Admit seq with the prefix cache, computing the rest of its prompt in one go."""
    hits = bm.find_cached_prefix(seq)
    n = seq.num_tokens - len(hits) * BS
    assert bm.allocate(seq, n, hits)
    seq.num_computed_tokens = seq.num_tokens


def check_ref_counts(bm: BlockManager) -> None:
    """Every block's ref_count is the number of tables holding it; free blocks are exactly ref 0 ones."""
    counts = [0] * bm.num_blocks
    for blocks in bm.seq_blocks.values():
        for b in blocks:
            counts[b.block_id] += 1
    assert [b.ref_count for b in bm.pool.blocks] == counts
    assert set(bm.pool.free_queue) == {i for i, c in enumerate(counts) if c == 0}
    for h, b in bm.pool.cached.items():
        assert b.block_hash == h


# -- hash chain -------------------------------------------------------------------------------------

def test_hash_chain_same_prefix_same_hashes():
    bm = BlockManager(16, BS)
    a = make_seq("a", range(10))
    b = make_seq("b", list(range(8)) + [50, 51, 52])
    bm._update_hashes(a)
    bm._update_hashes(b)
    assert len(a.block_hashes) == 2 and len(b.block_hashes) == 2  # only full blocks are hashed
    assert a.block_hashes == b.block_hashes
    assert a.block_hashes[0] == hash_block(None, [0, 1, 2, 3])
    assert a.block_hashes[1] == hash_block(a.block_hashes[0], [4, 5, 6, 7])
    assert a.block_hashes[0] != a.block_hashes[1]


def test_hash_chain_earlier_block_changes_later_hashes():
    h1 = hash_block(None, [1, 2, 3, 4])
    h1x = hash_block(None, [9, 2, 3, 4])
    assert h1 != h1x
    # identical second block content, different parent -> different hash
    assert hash_block(h1, [5, 6, 7, 8]) != hash_block(h1x, [5, 6, 7, 8])
    # the parent matters, not only the tokens
    assert hash_block(None, [5, 6, 7, 8]) != hash_block(h1, [5, 6, 7, 8])
    # token order matters
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [4, 3, 2, 1])


def test_hash_chain_extends_with_output_tokens():
    bm = BlockManager(16, BS)
    s = make_seq("s", [1, 2, 3, 4, 5, 6])
    bm._update_hashes(s)
    assert len(s.block_hashes) == 1
    s.output_token_ids += [7, 8]  # block 1 is now full, spanning prompt and output
    bm._update_hashes(s)
    assert len(s.block_hashes) == 2
    assert s.block_hashes[1] == hash_block(s.block_hashes[0], [5, 6, 7, 8])
    first = list(s.block_hashes)
    bm._update_hashes(s)  # idempotent
    assert s.block_hashes == first


def test_hash_bytes_deterministic():
    h = hash_block(None, [1, 2, 3, 4])
    assert isinstance(h, bytes) and len(h) == 16
    assert h == hash_block(None, [1, 2, 3, 4])  # stable across calls
    assert h == hash_block(None, np.array([1, 2, 3, 4], dtype=np.int32).tolist())
    # the documented recipe: blake2b-128 over parent bytes then int64 token bytes
    ref = hashlib.blake2b(digest_size=16)
    ref.update(np.asarray([1, 2, 3, 4], dtype=np.int64).tobytes())
    assert h == ref.digest()
    assert h.hex() == "087a24230771ee662be37e5493b333d7"
    assert hash_block(h, [5, 6, 7, 8]).hex() == "8222aab65152a8711ac413a3333a672c"


def test_hash_blocks_is_the_chain_of_hash_block():
    """The one-buffer path gives hash_block's chain on random prompts: any block size, a parent or none, a
    partial block at the end left out, ids past 2**31."""
    rng = random.Random(0)
    for _ in range(200):
        bs = rng.choice([1, 2, 4, 16, 32])
        tokens = [rng.randrange(2**40 if rng.random() < 0.2 else 200_000) for _ in range(rng.randrange(0, 300))]
        parent = rng.choice([None, hash_block(None, [rng.randrange(100) for _ in range(bs)])])
        chain, h = [], parent
        for i in range(len(tokens) // bs):
            h = hash_block(h, tokens[i * bs : (i + 1) * bs])
            chain.append(h)
        assert hash_blocks(parent, tokens, bs) == chain


def test_hash_chain_extended_in_pieces_equals_at_once():
    """_update_hashes called as tokens arrive (prompt, then outputs one by one) gives the same chain as once."""
    rng = random.Random(1)
    bm = BlockManager(16, BS)
    prompt = [rng.randrange(1000) for _ in range(21)]
    outputs = [rng.randrange(1000) for _ in range(19)]
    a, b = make_seq("a", prompt), make_seq("b", prompt + outputs)
    bm._update_hashes(a)
    for t in outputs:
        a.output_token_ids.append(t)
        bm._update_hashes(a)
    bm._update_hashes(b)
    assert a.block_hashes == b.block_hashes and len(a.block_hashes) == 40 // BS


def test_hash_stable_across_processes():
    code = ("from meshserve.engine.block_manager import hash_block as h; "
            "p = h(None, [1, 2, 3, 4]); print(p.hex(), h(p, [5, 6, 7, 8]).hex())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    p = hash_block(None, [1, 2, 3, 4])
    assert out.stdout.split() == [p.hex(), hash_block(p, [5, 6, 7, 8]).hex()]


# -- allocation -------------------------------------------------------------------------------------

def test_block_table_grows_with_tokens():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    s = make_seq("s", range(9))
    assert bm.block_table(s) == []
    compute(bm, s, 5)
    t1 = list(bm.block_table(s))  # block_table is a live list; keep a snapshot
    assert len(t1) == 2
    compute(bm, s, 3)  # 8 tokens: still 2 blocks
    assert bm.block_table(s) == t1
    compute(bm, s, 1)  # 9 tokens: a third block appended, earlier ones unchanged
    t3 = bm.block_table(s)
    assert len(t3) == 3 and t3[:2] == t1
    assert len(set(t3)) == 3
    assert bm.num_free_blocks == 5
    # decode: output tokens grow the table the same way
    for _ in range(3):
        s.output_token_ids.append(1)
        compute(bm, s, 1)
    assert len(bm.block_table(s)) == 3  # 12 tokens
    s.output_token_ids.append(1)
    compute(bm, s, 1)
    assert len(bm.block_table(s)) == 4  # 13 tokens
    check_ref_counts(bm)


def test_blocks_needed():
    bm = BlockManager(8, BS)
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocation_failure_changes_nothing():
    bm = BlockManager(3, BS)
    a = make_seq("a", range(8))
    compute(bm, a, 8)
    cached_before = dict(bm.pool.cached)
    free_before = list(bm.pool.free_queue)
    b = make_seq("b", range(100, 108))
    assert bm.allocate(b, 8) is False  # needs 2, only 1 free
    assert bm.block_table(b) == []
    assert b.seq_id not in bm.seq_blocks
    assert list(bm.pool.free_queue) == free_before
    assert bm.pool.cached == cached_before
    # growing an existing sequence beyond the pool fails the same way
    a.output_token_ids += [1] * 8
    table = bm.block_table(a)
    assert bm.allocate(a, 8) is False  # 16 tokens need 4 blocks, 2 held + 1 free
    assert bm.block_table(a) == table
    assert list(bm.pool.free_queue) == free_before
    assert bm.pool.cached == cached_before
    assert all(b.ref_count == 1 for b in bm.seq_blocks["a"])
    # exactly what is free succeeds
    assert bm.allocate(a, 4)
    assert bm.num_free_blocks == 0
    check_ref_counts(bm)


def test_full_blocks_registered_in_cache():
    bm = BlockManager(8, BS)
    s = make_seq("s", range(10))
    compute(bm, s, 6)  # block 0 full, block 1 half
    blocks = bm.seq_blocks["s"]
    assert bm.pool.cached == {s.block_hashes[0]: blocks[0]}
    assert blocks[1].block_hash is None
    compute(bm, s, 4)  # block 1 full now
    blocks = bm.seq_blocks["s"]
    assert len(blocks) == 3
    assert bm.pool.cached == {s.block_hashes[0]: blocks[0], s.block_hashes[1]: blocks[1]}
    assert blocks[2].block_hash is None


# -- prefix caching ---------------------------------------------------------------------------------

def test_prefix_hit_after_free_reuses_blocks():
    bm = BlockManager(8, BS)
    a = make_seq("a", range(10))
    run_prompt(bm, a)
    a_table = bm.block_table(a)
    bm.free(a)
    assert bm.num_free_blocks == 8
    assert bm.usage == 0.0

    b = make_seq("b", list(range(8)) + [50, 51, 52])
    hits = bm.find_cached_prefix(b)
    assert [h.block_id for h in hits] == a_table[:2]
    assert bm.allocate(b, b.num_tokens - 8, hits)
    b_table = bm.block_table(b)
    assert b_table[:2] == a_table[:2]
    assert a_table == [0, 1, 2]
    assert b_table == [0, 1, 3]  # the tail comes from the never-used blocks, not a's evictable tail
    assert [blk.ref_count for blk in bm.seq_blocks["b"]] == [1, 1, 1]
    assert bm.num_free_blocks == 5
    check_ref_counts(bm)


def test_prefix_sharing_while_alive():
    bm = BlockManager(8, BS)
    a = make_seq("a", range(10))
    run_prompt(bm, a)
    b = make_seq("b", list(range(8)) + [60, 61, 62, 63, 64])
    run_prompt(bm, b)
    ta, tb = bm.block_table(a), bm.block_table(b)
    assert tb[:2] == ta[:2]
    assert tb[2] not in ta and len(tb) == 4
    assert [blk.ref_count for blk in bm.seq_blocks["a"]] == [2, 2, 1]
    assert [blk.ref_count for blk in bm.seq_blocks["b"]] == [2, 2, 1, 1]
    # 5 distinct blocks in use
    assert bm.num_free_blocks == 3
    assert bm.usage == pytest.approx(5 / 8)
    check_ref_counts(bm)
    # freeing A keeps the shared blocks with B
    bm.free(a)
    assert [blk.ref_count for blk in bm.seq_blocks["b"]] == [1, 1, 1, 1]
    assert bm.num_free_blocks == 4
    check_ref_counts(bm)


def test_same_step_sharing_before_compute():
    """Blocks become findable as soon as they are allocated (n > 1 samples share one prompt)."""
    bm = BlockManager(8, BS)
    a = make_seq("a", range(9))
    assert bm.allocate(a, 9)  # not computed yet
    b = make_seq("b", range(9))
    hits = bm.find_cached_prefix(b)
    assert [h.block_id for h in hits] == bm.block_table(a)[:2]


def test_hit_stops_at_first_miss():
    bm = BlockManager(8, BS)
    a = make_seq("a", range(13))
    run_prompt(bm, a)
    # same block 0, different block 1, same block 2 tokens
    b = make_seq("b", [0, 1, 2, 3, 99, 5, 6, 7, 8, 9, 10, 11, 12])
    assert [h.block_id for h in bm.find_cached_prefix(b)] == bm.block_table(a)[:1]
    # different first block: no hit at all, even though later tokens are identical
    c = make_seq("c", [99] + list(range(1, 13)))
    assert bm.find_cached_prefix(c) == []


def test_at_least_one_token_left_to_compute():
    bm = BlockManager(8, BS)
    a = make_seq("a", range(12))
    run_prompt(bm, a)
    exact = make_seq("exact", range(8))  # exactly two full blocks, both cached
    hits = bm.find_cached_prefix(exact)
    assert len(hits) == 1
    assert bm.allocate(exact, 8 - 4, hits)
    assert len(bm.block_table(exact)) == 2
    one_more = make_seq("one_more", range(9))
    assert len(bm.find_cached_prefix(one_more)) == 2
    tiny = make_seq("tiny", range(4))
    assert bm.find_cached_prefix(tiny) == []
    check_ref_counts(bm)


def test_prompt_logprobs_skip_cache():
    bm = BlockManager(8, BS)
    a = make_seq("a", range(10))
    run_prompt(bm, a)
    b = make_seq("b", range(10), prompt_logprobs=1)
    assert bm.find_cached_prefix(b) == []
    bm.record_admission(b, 0)
    assert bm.stats.queries == 0 and bm.stats.hits == 0
    c = make_seq("c", range(10), prompt_logprobs=0)  # 0 is still "asks for prompt logprobs"
    assert bm.find_cached_prefix(c) == []


def test_eviction_is_lru_and_evicted_block_no_longer_hits():
    bm = BlockManager(4, BS)
    a = make_seq("a", range(4))  # one full block
    b = make_seq("b", range(100, 104))
    run_prompt(bm, a)
    run_prompt(bm, b)
    ba, bb = bm.block_table(a)[0], bm.block_table(b)[0]
    assert (ba, bb) == (0, 1)  # fresh pool hands out blocks in id order
    bm.free(a)
    bm.free(b)
    # never-used blocks first, then a (freed first), then b
    assert list(bm.pool.free_queue) == [2, 3, ba, bb]
    a_probe = make_seq("pa", list(range(4)) + [7])
    b_probe = make_seq("pb", list(range(100, 104)) + [7])
    assert [h.block_id for h in bm.find_cached_prefix(a_probe)] == [ba]
    assert [h.block_id for h in bm.find_cached_prefix(b_probe)] == [bb]

    c = make_seq("c", range(200, 212))  # 3 blocks: takes 2, 3 and evicts a's block
    compute(bm, c, 12)
    assert bm.block_table(c) == [2, 3, ba]
    assert bm.find_cached_prefix(a_probe) == []  # evicted: no longer a hit
    assert bm.pool.blocks[ba].block_hash == c.block_hashes[2]
    assert a.block_hashes[0] not in bm.pool.cached
    assert [h.block_id for h in bm.find_cached_prefix(b_probe)] == [bb]  # still warm
    check_ref_counts(bm)


def test_revived_block_goes_to_back_of_queue_when_freed_again():
    bm = BlockManager(4, BS)
    a = make_seq("a", range(5))
    run_prompt(bm, a)  # blocks 0, 1
    bm.free(a)  # queue: 2, 3, 1, 0
    assert list(bm.pool.free_queue) == [2, 3, 1, 0]
    b = make_seq("b", range(5))
    run_prompt(bm, b)  # hit on block 0 + takes block 2
    assert bm.block_table(b) == [0, 2]
    assert list(bm.pool.free_queue) == [3, 1]
    bm.free(b)
    assert list(bm.pool.free_queue) == [3, 1, 2, 0]


def test_free_puts_tail_blocks_first_in_eviction_queue():
    bm = BlockManager(4, BS)
    a = make_seq("a", range(12))
    run_prompt(bm, a)
    assert bm.block_table(a) == [0, 1, 2]
    bm.free(a)
    assert list(bm.pool.free_queue) == [3, 2, 1, 0]
    # taking two blocks evicts the unused one and a's tail; a's prefix stays cached
    other = make_seq("o", range(300, 308))
    compute(bm, other, 8)
    assert bm.block_table(other) == [3, 2]
    probe = make_seq("p", list(range(12)) + [5])
    assert [h.block_id for h in bm.find_cached_prefix(probe)] == [0, 1]
    check_ref_counts(bm)


def test_free_unknown_or_twice_is_harmless():
    bm = BlockManager(4, BS)
    s = make_seq("s", range(6))
    bm.free(s)
    compute(bm, s, 6)
    bm.free(s)
    bm.free(s)
    assert bm.num_free_blocks == 4
    assert all(b.ref_count == 0 for b in bm.pool.blocks)


def test_revived_cached_blocks_count_against_free_capacity():
    bm = BlockManager(4, BS)
    a = make_seq("a", range(8))
    run_prompt(bm, a)  # blocks 0, 1 (both full, cached)
    bm.free(a)
    assert bm.num_free_blocks == 4  # cached free blocks count as free
    free_before = list(bm.pool.free_queue)

    # 8 cached + 9 new tokens = 17 tokens = 5 blocks: 2 revived + 3 new, but only 2 non-hit blocks free
    big = make_seq("big", list(range(8)) + list(range(100, 109)))
    hits = bm.find_cached_prefix(big)
    assert len(hits) == 2
    assert bm.allocate(big, big.num_tokens - 8, hits) is False
    assert list(bm.pool.free_queue) == free_before
    assert all(b.ref_count == 0 for b in bm.pool.blocks)
    assert len(bm.pool.cached) == 2
    assert big.seq_id not in bm.seq_blocks

    # 8 cached + 8 new = 16 tokens = 4 blocks: 2 revived + 2 new fits exactly
    fit = make_seq("fit", list(range(8)) + list(range(100, 108)))
    hits = bm.find_cached_prefix(fit)
    assert len(hits) == 2
    assert bm.allocate(fit, fit.num_tokens - 8, hits)
    assert bm.num_free_blocks == 0
    assert bm.block_table(fit)[:2] == [0, 1]
    check_ref_counts(bm)


def test_hit_on_live_blocks_needs_no_free_capacity_for_them():
    bm = BlockManager(4, BS)
    a = make_seq("a", range(8))
    run_prompt(bm, a)  # holds 0, 1; 2 free
    b = make_seq("b", list(range(8)) + list(range(100, 108)))
    hits = bm.find_cached_prefix(b)
    assert [h.ref_count for h in hits] == [1, 1]
    assert bm.allocate(b, 8, hits)  # 2 shared + 2 new = exactly the 2 free
    assert bm.num_free_blocks == 0
    assert [blk.ref_count for blk in bm.seq_blocks["a"]] == [2, 2]
    check_ref_counts(bm)


def test_stats_and_hit_rate():
    bm = BlockManager(8, BS)
    assert bm.stats.hit_rate == 0.0
    a = make_seq("a", range(10))
    hits = bm.find_cached_prefix(a)
    bm.record_admission(a, len(hits) * BS)
    run_prompt(bm, a)
    assert (bm.stats.queries, bm.stats.hits) == (10, 0)
    b = make_seq("b", list(range(8)) + [9, 9, 9, 9, 9, 9])  # 14 tokens, 8 hit
    hits = bm.find_cached_prefix(b)
    bm.record_admission(b, len(hits) * BS)
    assert (bm.stats.queries, bm.stats.hits) == (24, 8)
    assert bm.stats.hit_rate == pytest.approx(8 / 24)


def test_usage():
    bm = BlockManager(4, BS)
    assert bm.usage == 0.0
    a = make_seq("a", range(8))
    compute(bm, a, 8)
    assert bm.usage == pytest.approx(0.5)
    b = make_seq("b", range(50, 66))
    assert bm.allocate(b, 8)
    assert bm.usage == pytest.approx(1.0)
    bm.free(a)
    bm.free(b)
    assert bm.usage == 0.0  # cached free blocks count as free


def test_reset_prefix_cache():
    bm = BlockManager(8, BS)
    a = make_seq("a", range(10))
    run_prompt(bm, a)
    assert bm.reset_prefix_cache() is False  # a holds blocks
    assert len(bm.pool.cached) == 2
    bm.free(a)
    assert bm.reset_prefix_cache() is True
    assert bm.pool.cached == {}
    assert all(b.block_hash is None for b in bm.pool.blocks)
    assert bm.find_cached_prefix(make_seq("b", range(10))) == []
    assert bm.num_free_blocks == 8


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq("a", range(10))
    compute(bm, a, 10)
    assert bm.pool.cached == {}
    assert all(b.block_hash is None for b in bm.pool.blocks)
    b = make_seq("b", range(10))
    assert bm.find_cached_prefix(b) == []
    bm.free(a)
    assert bm.find_cached_prefix(b) == []
    bm.record_admission(b, 0)
    assert bm.stats.queries == 0


def test_retired_blocks_are_never_handed_out_again_and_shared_ones_are_released():
    bm = BlockManager(8, BS)
    a = make_seq("a", range(8))  # 2 full blocks, cached
    run_prompt(bm, a)
    b = make_seq("b", range(16))  # shares a's 2 blocks, 2 of its own
    run_prompt(bm, b)
    shared, own = bm.block_table(b)[:2], bm.block_table(b)[2:]
    own_hashes = b.block_hashes[2:4]
    assert all(h in bm.pool.cached for h in own_hashes)
    bm.retire(b)
    assert not any(h in bm.pool.cached for h in own_hashes)  # never found as a prefix hit
    assert bm.num_retired_blocks == 2 and bm.num_free_blocks == 8 - 4
    bm.free(a)  # the shared blocks were released by the retirement: a's release frees them
    assert bm.num_free_blocks == 6
    c = make_seq("c", range(100, 124))  # 6 blocks: every block but the retired two
    run_prompt(bm, c)
    assert not set(bm.block_table(c)) & set(own) and set(shared) <= set(bm.block_table(c))
