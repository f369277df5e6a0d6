"""KVTransferEngine: stores and loads move whole blocks of every layer, in op order, checked in debug mode."""

from __future__ import annotations

import pytest
import torch

from meshserve.engine.kv_offload.cpu_tier import CPUTier
from meshserve.engine.kv_offload.manager import KVOffloadStats
from meshserve.engine.kv_offload.transfer import KVChecksumError, KVTransferEngine, _runs

LAYERS, BLOCKS, BS, HEADS, DIM = 3, 8, 4, 2, 5


def pool(device: str = "cpu", dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, BLOCKS, BS, HEADS, DIM, generator=g).to(device=device, dtype=dtype)
            for _ in range(LAYERS)]


def engine(kv: list[torch.Tensor], verify: bool = False, slots: int = 6) -> KVTransferEngine:
    cpu = CPUTier(slots, (LAYERS, 2, BS, HEADS, DIM), kv[0].dtype, pin_memory=kv[0].is_cuda)
    return KVTransferEngine(kv, cpu, KVOffloadStats(), verify)


def block(kv: list[torch.Tensor], b: int) -> torch.Tensor:
    return torch.stack([t[:, b] for t in kv]).cpu()


def test_runs_of_consecutive_slots():
    assert _runs([3, 4, 5, 0, 2, 3]) == [(0, 3, 3), (3, 0, 1), (4, 2, 2)]


def test_store_then_load_in_one_step_keeps_op_order():
    kv = pool()
    before = [block(kv, b) for b in range(BLOCKS)]
    eng = engine(kv)
    # block 1 is stored, then overwritten by block 2's copy restored from its slot, within one op list
    eng.run([("store", 1, 0), ("store", 2, 1), ("store", 5, 4), ("load", 1, 1), ("load", 0, 6), ("load", 4, 7)])
    assert torch.equal(eng.cpu.tensor[0], before[1]) and torch.equal(eng.cpu.tensor[4], before[5])
    assert torch.equal(block(kv, 1), before[2])
    assert torch.equal(block(kv, 6), before[1])
    assert torch.equal(block(kv, 7), before[5])
    assert torch.equal(block(kv, 0), before[0])  # untouched
    assert eng.stats.restores == 1 and eng.stats.link_bytes_per_s > 0


def test_verify_mode_catches_a_changed_slot():
    kv = pool()
    eng = engine(kv, verify=True)
    eng.run([("store", 3, 2)])
    assert 2 in eng.cpu.checksums
    eng.run([("load", 2, 4)])  # intact: fine
    eng.cpu.tensor[2, 1, 0, 0, 0, 0] += 1.0
    with pytest.raises(KVChecksumError):
        eng.run([("load", 2, 5)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_side_stream_matches_cpu_path(dtype):
    ops = [("store", 1, 0), ("store", 2, 1), ("store", 6, 3), ("load", 1, 1), ("load", 3, 6), ("load", 0, 7)]
    ref_kv, gpu_kv = pool("cpu", dtype), pool("cuda", dtype)
    ref, eng = engine(ref_kv), engine(gpu_kv, verify=True)
    ref.run(ops)
    eng.run(ops)
    # the compute stream waits on the copies: work queued after run() sees the restored blocks
    sums = [t.float().sum() for t in gpu_kv]
    torch.cuda.synchronize()
    assert eng.cpu.tensor.is_pinned()
    for a, b in zip(ref_kv, gpu_kv):
        assert torch.equal(a, b.cpu())
    assert torch.equal(ref.cpu.tensor[[0, 1, 3]], eng.cpu.tensor[[0, 1, 3]])
    assert all(torch.isfinite(s) for s in sums)
    eng.run([("store", 0, 5)])
    eng.cpu.wait(5)  # the host waits on the slot's event before reading it
    assert torch.equal(eng.cpu.tensor[5], block(gpu_kv, 0))


@pytest.mark.gpu
def test_copies_never_make_the_host_wait_for_the_compute_before_them():
    import time

    kv = pool("cuda", torch.float16)
    eng = engine(kv)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # the forward the copies follow: about a second of compute queued
    t0 = time.perf_counter()
    eng.run([("store", 1, 0), ("load", 0, 5)])  # then the next step's copies, before its forward is queued
    eng.run([("store", 2, 1)])
    launched_s = time.perf_counter() - t0
    assert launched_s < 0.2, f"the host waited {launched_s:.2f} s for the compute before the copies"
    assert not eng.cpu.store_events[2].query()  # queued behind the compute, not run
    eng.cpu.wait(1)
    assert torch.equal(eng.cpu.tensor[1], block(kv, 2)) and torch.equal(kv[0][:, 5].cpu(), kv[0][:, 1].cpu())


def test_large_batches_go_in_chunks_with_the_same_result(monkeypatch):
    from meshserve.engine.kv_offload import transfer

    kv = pool()
    before = [block(kv, b) for b in range(BLOCKS)]
    eng = engine(kv)
    monkeypatch.setattr(transfer, "STAGING_BYTES", 2 * eng.cpu.block_bytes)  # 2 blocks a chunk
    eng.run([("store", b, 5 - b) for b in range(5)] + [("load", 5 - b, 7 - b) for b in range(5)])
    assert all(torch.equal(eng.cpu.tensor[5 - b], before[b]) for b in range(5))
    assert all(torch.equal(block(kv, 7 - b), before[b]) for b in range(5))
    assert eng.stats.restores == 3  # the 5 loads in chunks of 2, 2 and 1
