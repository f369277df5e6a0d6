"""What sending a step's grammar masks to a TP worker cost the host, on the CPU (issue 27): a decode step of B
sequences as rank 0 sends it (the workers hold the params and block tables: step_delta.py), with and without
the [B, vocab / 32] int32 masks that went with it before rank 0 filled them late (EngineCore._late_masks_hook).
Times the pickle (rank 0) and unpickle (the worker) in one process, then rank 0's ObjectChannel.broadcast to a
second process over gloo (both ranks meet at a barrier before each: the send, not the wait for the worker).
Medians and minimums over the repetitions; host work only, no device.

    PYTHONPATH=<checkout> python tools/grammar_mask_wire_cpu.py [--batch 64] [--vocab 49152] [--reps 200]
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import statistics
import time


def step_message(batch: int, vocab: int, with_masks: bool):
    """("execute", (SchedulerOutput,)) of a decode step as the workers get it, with the masks or without."""
    import torch

    from meshserve.engine.scheduler_output import ScheduledSequence, SchedulerOutput

    out = SchedulerOutput([ScheduledSequence(f"r{i}", [-1], 300 + i, [], None, True) for i in range(batch)])
    if with_masks:
        out.grammar_bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, (vocab + 31) // 32), dtype=torch.int32)
    return ("execute", (out,))


def ms(times: list[float]) -> str:
    return f"median {statistics.median(times) * 1e3:.3f} ms (min {min(times) * 1e3:.3f})"


def pickling(batch: int, vocab: int, reps: int) -> None:
    for with_masks in (False, True):
        msg = step_message(batch, vocab, with_masks)
        dumps, loads = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
            t1 = time.perf_counter()
            pickle.loads(data)
            dumps.append(t1 - t0)
            loads.append(time.perf_counter() - t1)
        print(f"masks={with_masks}: {len(data) / 1e3:.1f} KB; pickle {ms(dumps)}, unpickle {ms(loads)}", flush=True)


def rank_main(rank: int, port: int, batch: int, vocab: int, reps: int, results) -> None:
    import torch.distributed as dist

    from meshserve.distributed.object_channel import ObjectChannel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    channel = ObjectChannel(dist.group.WORLD)
    times: dict[bool, list[float]] = {False: [], True: []}
    for with_masks in (False, True, False, True):  # interleaved: a load change hits both alike
        msg = step_message(batch, vocab, with_masks) if rank == 0 else None
        for _ in range(reps // 2):
            dist.barrier()
            t0 = time.perf_counter()
            channel.broadcast(msg)
            times[with_masks].append(time.perf_counter() - t0)
    if rank == 0:
        results.put(times)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--reps", type=int, default=200)
    ns = p.parse_args()
    pickling(ns.batch, ns.vocab, ns.reps)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, port, ns.batch, ns.vocab, ns.reps, results)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    times = results.get(timeout=600)
    for proc in procs:
        proc.join()
    for with_masks, t in times.items():
        print(f"rank 0's broadcast to 1 worker, masks={with_masks}: {ms(t)}")


if __name__ == "__main__":
    main()
