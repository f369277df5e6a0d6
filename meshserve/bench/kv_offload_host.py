"""KV offload's host side on a CPU: the restore path's Python time and the disk tier's throughput.

`python -m meshserve.bench.kv_offload_host` (no GPU). Two measurements, one JSON line each:
  restore  a revisit of --blocks blocks found in the CPU tier: the block manager's lookup, the offload manager's
           ops and the transfer engine's copies (synchronous here), with a tiny block of --layers layers so the
           copies cost little and the Python bookkeeping shows (the device run's host overhead per revisit)
  revisit_moves  the device bench's revisit replayed on the block manager (a history, 3 fillers, the history
           again, 8K-token chunks): the blocks its steps must store before its forward, with and without the
           write-through of filled blocks (the copies the revisit's TTFT waits for on the device)
  disk     the disk tier's format with blocks of --block-mib: writes (put, then flush) and a restore's reads of
           the same blocks through the offload manager while the engine loop polls as a real one does
           (reads from the page cache: this is the format's and the threads' cost, not the drive's)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

import torch

from meshserve.engine.block_manager import BlockManager
from meshserve.engine.kv_offload.copy_stream import CopyEvent
from meshserve.engine.kv_offload.cpu_tier import CPUTier
from meshserve.engine.kv_offload.disk_tier import DiskTier
from meshserve.engine.kv_offload.manager import KVOffloadManager, KVOffloadStats
from meshserve.engine.kv_offload.transfer import KVTransferEngine

BS = 16


def _hashes(n: int, salt: int = 0) -> list[bytes]:
    return [(salt * 1_000_003 + i).to_bytes(16, "little") for i in range(n)]


def bench_restore(blocks: int, layers: int, gpu_blocks: int, repeats: int) -> dict:
    shape = (layers, 2, BS, 1, 8)
    kv = [torch.zeros((2, gpu_blocks, BS, 1, 8)) for _ in range(layers)]
    best = {}
    for _ in range(repeats):
        bm = BlockManager(gpu_blocks, BS)
        cpu = CPUTier(blocks + 8, shape, torch.float32, False)
        manager = KVOffloadManager(cpu, None)
        bm.attach_offload(manager)
        engine = KVTransferEngine(kv, cpu, KVOffloadStats())
        hashes = _hashes(blocks)
        for i, h in enumerate(hashes):
            cpu.insert(h, cpu.allocate())
        t0 = time.perf_counter()
        fresh = bm._restore(hashes, [])
        t1 = time.perf_counter()
        ops = bm.take_transfers()
        t2 = time.perf_counter()
        engine.run(ops)
        t3 = time.perf_counter()
        assert len(fresh) == blocks, len(fresh)
        row = {"lookup_ms": (t1 - t0) * 1e3, "take_ms": (t2 - t1) * 1e3, "copies_ms": (t3 - t2) * 1e3,
               "total_ms": (t3 - t0) * 1e3}
        if not best or row["total_ms"] < best["total_ms"]:
            best = row
    return {"bench": "restore", "blocks": blocks, "layers": layers, **{k: round(v, 2) for k, v in best.items()}}


def _seq(seq_id: str, ids: list[int]):
    from meshserve.engine.sequence import Sequence
    from meshserve.sampling import SamplingParams

    return Sequence(seq_id=seq_id, request_id=seq_id, index=0, prompt_token_ids=ids,
                    params=SamplingParams(max_tokens=1), max_tokens=1)


def bench_revisit_moves(history_blocks: int, gpu_blocks: int, chunk_tokens: int, write_through: bool) -> dict:
    """The block manager's side of the device bench's revisit (a history, 3 fillers, the history again), each
    prompt prefilled in chunks as the scheduler would, copies landing by the next step: what the revisit's
    steps must copy before its forward can run (the device time it waits), and how many steps it takes."""
    bm = BlockManager(gpu_blocks, BS)
    cpu = CPUTier(8 * history_blocks, (1,), torch.float32, False)
    manager = KVOffloadManager(cpu, None)
    bm.attach_offload(manager)
    bm.store_ahead_blocks = chunk_tokens // BS + 8  # the scheduler's sizing (max_num_batched_tokens + seqs)

    def step(seq, num_new: int, hits=None) -> tuple[int, int, bool]:
        ok = bm.allocate(seq, num_new, hits) if num_new else False
        if not write_through:
            bm.filled = []
        before, after = bm.take_step_transfers()
        for kind, gpu, _ in before + after:
            if kind == "store":
                cpu.store_events[gpu] = CopyEvent()  # landed by the next step's poll
        bm.poll_offload()
        stores = sum(k == "store" for k, _, _ in before)
        return stores, sum(k == "load" for k, _, _ in before), ok

    def prefill(seq_id: str, ids: list[int]) -> dict:
        seq = _seq(seq_id, ids)
        steps = stores_before = loads = 0
        while seq.num_computed_tokens < len(ids):
            hits = bm.find_cached_prefix(seq) if seq.num_computed_tokens == 0 else []
            hits = hits or []
            num_new = min(len(ids) - seq.num_computed_tokens - len(hits) * BS, chunk_tokens)
            s, l, ok = step(seq, num_new, hits)
            steps, stores_before, loads = steps + 1, stores_before + s, loads + l
            if ok:
                seq.num_computed_tokens += len(hits) * BS + num_new
        bm.free(seq)
        return {"steps": steps, "stores_before_forward": stores_before, "loads": loads}

    n = history_blocks * BS
    history = list(range(n))
    for k in range(4):
        prefill(f"p{k}", history if k == 0 else [10**6 * k + i for i in range(n)])
    row = prefill("revisit", history + [7] * 32)
    return {"bench": "revisit_moves", "write_through": write_through, "history_blocks": history_blocks,
            "gpu_blocks": gpu_blocks, **row}


def bench_disk(blocks: int, block_mib: float, path: str | None) -> dict:
    block_bytes = int(block_mib * (1 << 20)) // 4 * 4
    root = tempfile.mkdtemp(prefix="meshserve-kvdisk-", dir=path)
    try:
        disk = DiskTier(root, bytes(16), blocks * (block_bytes + 4096) * 2, block_bytes)
        payload = torch.randint(0, 255, (block_bytes,), dtype=torch.uint8).numpy()
        hashes = _hashes(blocks, salt=1)
        t0 = time.perf_counter()
        for i, h in enumerate(hashes):
            payload[:8] = i % 256  # distinct blocks
            disk.put(h, payload.tobytes())
        t_put = time.perf_counter() - t0
        disk.flush()
        t_write = time.perf_counter() - t0
        disk.close()
        disk = DiskTier(root, bytes(16), blocks * (block_bytes + 4096) * 2, block_bytes)  # a restart
        cpu = CPUTier(blocks, (block_bytes // 4,), torch.float32, False)
        manager = KVOffloadManager(cpu, disk)
        polls = 0
        t0 = time.perf_counter()
        while True:  # the engine loop: poll, look the run up, until it is all in the CPU tier
            manager.poll()
            found, reading = manager.find(hashes)
            polls += 1
            if not reading:
                break
            getattr(manager, "wait_io", lambda: None)()  # absent before the engine loop waited
        t_read = time.perf_counter() - t0
        assert len(found) == blocks, (len(found), manager.stats.disk_errors)
        rate = disk.read_rate  # what the restore decision would predict reads at now (read_rate.py)
        disk.close()
        gb = blocks * block_bytes / 1e9
        return {"bench": "disk", "blocks": blocks, "block_mib": block_mib, "put_s": round(t_put, 3),
                "write_s": round(t_write, 3), "write_GBps": round(gb / t_write, 2), "read_s": round(t_read, 3),
                "read_GBps": round(gb / t_read, 2), "engine_polls": polls,
                "read_GB": round(manager.stats.disk_bytes_read / 1e9, 3),  # > the blocks' GB: some read twice
                "estimated_read_GBps": round(rate.bytes_per_s / 1e9, 2), "read_batches_timed": rate.num_measured}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--gpu-blocks", type=int, default=1400)
    ap.add_argument("--block-mib", type=float, default=2.0, help="disk block size (Llama-3.1-8B: 2 MiB)")
    ap.add_argument("--disk-blocks", type=int, default=512)
    ap.add_argument("--disk-path", default=None, help="where the disk tier's files go (default: /tmp)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="restore,moves,disk")
    ns = ap.parse_args(argv)
    parts = ns.parts.split(",")
    if "restore" in parts:
        print(json.dumps(bench_restore(ns.blocks, ns.layers, ns.gpu_blocks, ns.repeats)), flush=True)
    if "moves" in parts:
        for write_through in (False, True):
            print(json.dumps(bench_revisit_moves(ns.blocks, ns.gpu_blocks, 8192, write_through)), flush=True)
    if "disk" in parts:
        print(json.dumps(bench_disk(ns.disk_blocks, ns.block_mib, ns.disk_path)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
