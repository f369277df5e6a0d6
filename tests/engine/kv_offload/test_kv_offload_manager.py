"""KV offload through the BlockManager: evicted cached blocks are stored down, prefix misses restored, swaps."""

from __future__ import annotations

import torch

from meshserve.engine.block_manager import BlockManager
from meshserve.engine.kv_offload.copy_stream import CopyEvent
from meshserve.engine.kv_offload.cpu_tier import CPUTier
from meshserve.engine.kv_offload.manager import KVOffloadManager
from meshserve.engine.sequence import Sequence
from meshserve.sampling import SamplingParams

BS = 4


def make_seq(seq_id: str, prompt) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=seq_id, index=0, prompt_token_ids=list(prompt),
                    params=SamplingParams(max_tokens=4), max_tokens=4)


def setup(num_blocks: int = 8, slots: int = 4, mode: str = "recompute") -> tuple[BlockManager, KVOffloadManager]:
    bm = BlockManager(num_blocks, BS)
    manager = KVOffloadManager(CPUTier(slots, (1, 2, BS, 1, 1), torch.float32, False), None, mode)
    bm.attach_offload(manager)
    return bm, manager


def run_prompt(bm: BlockManager, seq: Sequence) -> list:
    hits = bm.find_cached_prefix(seq)
    assert bm.allocate(seq, seq.num_tokens - len(hits) * BS, hits)
    seq.num_computed_tokens = seq.num_tokens
    return hits


def launch(bm: BlockManager, manager: KVOffloadManager) -> list:
    """The step's ops, as if the runner ran them and their events fired; then the next step's poll."""
    ops = bm.take_transfers()
    for kind, a, _ in ops:
        if kind == "store":
            manager.cpu.store_events[a] = CopyEvent()
    bm.poll_offload()
    return ops


def test_evicted_blocks_go_down_and_come_back_as_prefix_hits():
    bm, manager = setup()
    a = make_seq("a", range(13))  # 3 full blocks registered, 1 partial
    run_prompt(bm, a)
    a_ids, a_hashes = list(bm.block_table(a)), list(a.block_hashes)
    bm.free(a)
    b = make_seq("b", range(100, 132))  # 8 blocks: every cached block of a is evicted
    assert not bm.allocate(b, 32)  # a's 3 cached blocks are copied down first, not handed out meanwhile
    assert bm.pool.in_flight == set(a_ids[:3]) and bm.num_free_blocks == 5 and bm.num_landing_blocks == 3
    assert not bm.allocate(b, 32)  # nothing changed: still in flight, no second store
    ops = launch(bm, manager)
    stored = {gpu: slot for kind, gpu, slot in ops if kind == "store"}
    assert sorted(stored) == sorted(a_ids[:3]) and all(h in manager.cpu for h in a_hashes)
    assert not bm.pool.in_flight and bm.num_free_blocks == 8
    run_prompt(bm, b)
    assert not manager.ops  # their content is below already: taken without another copy
    bm.free(b)
    a2 = make_seq("a2", range(13))
    hits = run_prompt(bm, a2)
    assert len(hits) == 3 and [blk.block_hash for blk in hits] == a_hashes
    ops = manager.take_transfers()
    loads = [(slot, gpu) for kind, slot, gpu in ops if kind == "load"]
    # each restored block is loaded from the slot its hash was stored to, after the stores of this step
    assert loads == [(stored[a_ids[i]], hits[i].block_id) for i in range(3)]
    kinds = [k for k, _, _ in ops]
    assert kinds == ["store"] * (len(kinds) - 3) + ["load"] * 3
    # a's restored blocks took blocks whose cached content (b's) went down first: none of them is in flight
    assert not {blk.block_id for blk in hits} & bm.pool.in_flight
    assert manager.stats.cpu_hits == 3


def test_restore_never_evicts_the_gpu_hits_before_it():
    bm, manager = setup(num_blocks=6, slots=8)
    a = make_seq("a", range(17))  # 4 full blocks + 1
    run_prompt(bm, a)
    a_head = bm.block_table(a)[0]
    bm.free(a)  # free queue: the unused block, then a's blocks tail first
    filler = make_seq("f", range(200, 208))
    run_prompt(bm, filler)
    bm.free(filler)
    c = make_seq("c", range(300, 309))  # 3 blocks: a's blocks 1-3 go down, a's head stays cached on the GPU
    assert not bm.allocate(c, 9)
    launch(bm, manager)
    run_prompt(bm, c)
    bm.free(c)
    manager.take_transfers()
    a2 = make_seq("a2", range(17))
    hits = bm.find_cached_prefix(a2)
    assert len(hits) == 4 and hits[0].block_id == a_head  # 1 GPU hit + 3 restored, the GPU hit kept
    assert [blk.block_hash for blk in hits] == a2.block_hashes[:4]
    assert len({blk.block_id for blk in hits}) == 4
    assert not bm.allocate(a2, 1, hits)  # the block for its last token held c's cached tail: copied down first
    launch(bm, manager)
    assert bm.allocate(a2, 1, hits)
    assert manager.stats.cpu_hits == 3


def test_swap_out_and_in():
    bm, manager = setup(num_blocks=8, slots=4, mode="swap")
    s = make_seq("s", range(10))
    run_prompt(bm, s)
    ids = list(bm.block_table(s))
    assert bm.swap_out(s, lambda: 1.0)
    # released, but its 3 blocks are being copied out: not allocatable, and s cannot resume, until that is done
    assert s.seq_id not in bm.seq_blocks and bm.num_free_blocks == 5 and bm.num_landing_blocks == 3
    assert not bm.allocate(s, 1)
    out_ops = launch(bm, manager)
    assert [(k, g) for k, g, _ in out_ops] == [("store", i) for i in ids]
    assert bm.num_free_blocks == 8
    assert bm.allocate(s, 1)  # resumes with its 10 computed tokens: 3 blocks, loads queued
    in_ops = manager.take_transfers()
    assert [(k, slot) for k, slot, _ in in_ops] == [("load", slot) for _, _, slot in out_ops]
    assert [g for _, _, g in in_ops] == bm.block_table(s)[:3]
    assert manager.stats.swaps_out == manager.stats.swaps_in == 1
    assert len(manager.cpu.free) == 4  # the slots are free again


def test_auto_swaps_only_when_moving_is_cheaper():
    bm, manager = setup(num_blocks=8, slots=4, mode="auto")
    manager.default_link_bytes_per_s = 1e3  # 2 x 3 blocks x 64 bytes = 0.384 s to move
    s = make_seq("s", range(10))
    run_prompt(bm, s)
    assert not bm.swap_out(s, lambda: 0.1)  # recompute is cheaper: nothing changed
    assert s.seq_id in bm.seq_blocks and not manager.ops
    assert bm.swap_out(s, lambda: 1.0)


def test_swap_refused_when_the_cpu_tier_is_full():
    bm, manager = setup(num_blocks=8, slots=2, mode="swap")
    s = make_seq("s", range(10))  # 3 blocks > 2 slots
    run_prompt(bm, s)
    assert not bm.swap_out(s, lambda: 1.0)
    assert len(manager.cpu.free) == 2 and not manager.ops
    bm.free(s)


def test_filled_blocks_are_written_through_after_the_forward():
    bm, manager = setup(num_blocks=8, slots=16)
    a = make_seq("a", range(13))  # 3 full blocks (written through), 1 partial (not)
    run_prompt(bm, a)
    a_ids = list(bm.block_table(a))
    before, after = bm.take_step_transfers()
    assert before == [] and [(k, gpu) for k, gpu, _ in after] == [("store", b) for b in a_ids[:3]]
    assert bm.pool.in_flight == set(a_ids[:3])  # not handed out until the copies land
    for _, gpu, _ in after:
        manager.cpu.store_events[gpu] = CopyEvent()
    bm.poll_offload()
    assert not bm.pool.in_flight and all(h in manager.cpu for h in a.block_hashes)
    bm.free(a)
    b = make_seq("b", range(100, 132))  # 8 blocks: a's cached blocks are evicted with no store to wait for
    assert bm.allocate(b, 32)
    before, after = bm.take_step_transfers()
    assert before == []  # nothing to copy down first; b's own 8 blocks are written through after its forward
    assert sorted(gpu for _, gpu, _ in after) == sorted(bm.block_table(b))
    for _, gpu, _ in after:
        manager.cpu.store_events[gpu] = CopyEvent()
    bm.poll_offload()
    bm.free(b)
    a2 = make_seq("a2", range(13))
    hits = bm.find_cached_prefix(a2)
    assert [blk.block_hash for blk in hits] == a.block_hashes[:3] and manager.stats.cpu_hits == 3
    before, after = bm.take_step_transfers()
    assert [k for k, _, _ in before] == ["load"] * 3 and after == []  # restored blocks are below already


def test_landed_blocks_are_written_behind_to_disk_from_a_slot_kept_meanwhile(tmp_path):
    import threading

    from meshserve.engine.kv_offload.disk_tier import DiskTier

    bm = BlockManager(8, BS)
    cpu = CPUTier(3, (1, 2, BS, 1, 1), torch.float32, False)
    disk = DiskTier(str(tmp_path), bytes(16), 1 << 20, cpu.block_bytes)
    manager = KVOffloadManager(cpu, disk)
    bm.attach_offload(manager)
    gate, write = threading.Event(), disk._write
    disk._write = lambda *args: (gate.wait(10), write(*args))  # a disk that answers when the test says
    a = make_seq("a", range(13))
    run_prompt(bm, a)
    launch(bm, manager)  # a's 3 blocks written through; landed: their disk writes start from the slots
    assert all(h in disk for h in a.block_hashes) and cpu.busy == set(range(3))
    assert cpu.allocate() is None  # every slot is being read by a write: none is handed out
    gate.set()
    disk.flush()
    manager.poll()
    assert not cpu.busy and not manager.writing
    slot = cpu.allocate()  # the least recent block goes, with nothing to spill (it is on disk already)
    assert slot is not None and manager.stats.disk_bytes_written == 3 * cpu.block_bytes
    assert disk.get(a.block_hashes[0]) is not None
    disk.close()


def _write_through(bm: BlockManager, manager: KVOffloadManager) -> None:
    """The step's write-through stores run and land (next step's poll)."""
    _, after = bm.take_step_transfers()
    for _, gpu, _ in after:
        manager.cpu.store_events[gpu] = CopyEvent()
    bm.poll_offload()


def test_cpu_copy_ages_from_when_the_gpu_drops_the_block_not_from_its_write_through():
    bm, manager = setup(num_blocks=5, slots=3)
    a = make_seq("a", range(9))  # 2 full blocks, written through first: the oldest copies below
    run_prompt(bm, a)
    _write_through(bm, manager)
    b = make_seq("b", range(100, 105))  # 1 full block, written through after a's
    run_prompt(bm, b)
    _write_through(bm, manager)
    bm.free(b)
    bm.free(a)  # b's GPU blocks are dropped first, then a's
    c = make_seq("c", range(200, 220))  # 5 fresh blocks: the GPU drops every cached block
    run_prompt(bm, c)
    lru = list(manager.cpu.lru)  # written through a, a, b; aged by the GPU's drop order: b, then a's
    assert lru[0] == b.block_hashes[0] and set(lru[1:]) == set(a.block_hashes[:2])
    assert manager.cpu.allocate() is not None  # c's write-through needs room: the first block dropped goes
    assert b.block_hashes[0] not in manager.cpu and all(h in manager.cpu for h in a.block_hashes[:2])


def test_a_gpu_block_whose_copy_below_was_evicted_is_stored_again_before_reuse():
    bm, manager = setup(num_blocks=6, slots=2)
    a = make_seq("a", range(9))  # 2 full blocks, written through: both slots
    run_prompt(bm, a)
    _write_through(bm, manager)
    a_ids = list(bm.block_table(a))
    assert bm.pool.stored == set(a_ids[:2])
    b = make_seq("b", range(100, 105))  # written through too: evicts a's oldest copy (no disk: it is gone)
    run_prompt(bm, b)
    _write_through(bm, manager)
    assert a.block_hashes[0] not in manager.cpu and a.block_hashes[1] in manager.cpu
    assert a_ids[0] not in bm.pool.stored and a_ids[1] in bm.pool.stored
    bm.free(a)
    c = make_seq("c", range(200, 216))  # 4 blocks: the GPU must reuse a's cached blocks
    assert not bm.allocate(c, 16)  # a's first block is copied down again first, not lost
    assert bm.pool.in_flight == {a_ids[0]}
    ops = manager.take_transfers()
    assert [(k, gpu) for k, gpu, _ in ops] == [("store", a_ids[0])]
