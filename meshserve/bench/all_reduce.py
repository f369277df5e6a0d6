"""`meshserve bench all-reduce`: the time of one TP all-reduce by message size, NCCL beside the one-shot
symmetric-memory kernel, both replayed from CUDA graphs as the decode step runs them; and what the decoder
layer runs after a row-parallel projection, the all-reduce + residual add + RMSNorm: the one-shot kernel then
the Triton norm (one_shot_norm_us) beside the one fused kernel (fused_norm_us, MESHSERVE_TP_FUSED_NORM=pull;
fused_push_norm_us: =push).

A decode step of Llama-3.1-8B makes 65 all-reduces of batch x 4096 bf16 values (two per layer and the
embedding); this measures what each costs, so the threshold between the two paths and the TP speed-up of
W1 can be read off (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os

CALLS_PER_GRAPH = 64  # even, like a forward's calls (no closing barrier in the one-shot scope)
REPLAYS = 20


def _time_graph(fn, x, device) -> float:
    """Microseconds per call of fn(x), CALLS_PER_GRAPH calls captured in one graph, best of REPLAYS."""
    import torch

    for _ in range(3):
        fn(x)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x
        for _ in range(CALLS_PER_GRAPH):
            y = fn(y)
    best = float("inf")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / CALLS_PER_GRAPH)
    return best


def _time_norms(fast, x, device) -> dict:
    """All-reduce + add + RMSNorm per call, unfused (one-shot, then the Triton norm) and fused; each call's
    new residual is the next call's input, as down_proj's sum becomes the next layer's residual."""
    import torch

    from meshserve.kernels.triton_ops import rms_norm

    residual = torch.zeros_like(x)  # zeros: the chained values stay x * world^n, finite over the graph
    weight = torch.ones(x.shape[-1], dtype=x.dtype, device=device)
    if not fast.can_fuse_rms_norm(x, residual, weight):
        return {}

    def unfused(t):
        return rms_norm(fast.all_reduce(t), weight, 1e-5, residual)[1]

    def fused(t):
        return fast.all_reduce_rms_norm(t, residual, weight, 1e-5)[1]

    def fused_push(t):
        return fast.all_reduce_rms_norm(t, residual, weight, 1e-5, push=True)[1]

    runs = [("one_shot_norm_us", unfused), ("fused_norm_us", fused)]
    if fast.can_fuse_rms_norm(x, residual, weight, push=True):
        runs.append(("fused_push_norm_us", fused_push))
    times = {}
    for name, fn in runs:
        with fast.forward_scope():
            times[name] = _time_graph(fn, x.clone(), device)
    return times


def _rank(rank: int, world: int, port: int, hidden: int, batches: list[int], out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from meshserve.distributed.symm_mem_all_reduce import try_symm_mem_all_reduce

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank,
                            device_id=device)
    group = dist.group.WORLD
    fast = try_symm_mem_all_reduce(group, device, torch.bfloat16, max_bytes=max(batches) * hidden * 2)

    def nccl(t):
        dist.all_reduce(t, group=group)
        return t

    rows = []
    for bs in batches:
        x = torch.full((bs, hidden), 1e-3, dtype=torch.bfloat16, device=device)
        row = {"batch": bs, "kib": bs * hidden * 2 / 1024, "nccl_us": _time_graph(nccl, x.clone(), device)}
        if fast is not None:
            def one_shot(t):
                return fast.all_reduce(t)

            with fast.forward_scope():
                row["one_shot_us"] = _time_graph(one_shot, x.clone(), device)
            want = x.float() * world
            got = fast.all_reduce(x)
            row["one_shot_max_err"] = float((got.float() - want).abs().max())
            row.update(_time_norms(fast, x, device))
        rows.append(row)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def run_all_reduce(ns) -> int:
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from meshserve.bench.report import print_table, write_json
    from meshserve.errors import InvalidArgumentError
    from meshserve.router.launcher import free_port

    if torch.cuda.device_count() < ns.tensor_parallel_size or ns.tensor_parallel_size < 2:
        raise InvalidArgumentError(f"bench all-reduce needs -tp >= 2 GPUs; {torch.cuda.device_count()} visible")
    batches = [int(b) for b in ns.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_rank, args=(ns.tensor_parallel_size, free_port(), ns.hidden_size, batches, out),
                 nprocs=ns.tensor_parallel_size)
        with open(out) as f:
            rows = json.load(f)
    res = {"bench": "all-reduce", "gpu": torch.cuda.get_device_name(0), "tp": ns.tensor_parallel_size,
           "hidden_size": ns.hidden_size}
    print_table(res)
    for row in rows:
        print("  ".join(f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    write_json(ns.output_json, {**res, "rows": rows})
    return 0


def add_all_reduce_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("all-reduce", help="TP all-reduce time by size: NCCL vs one-shot, and + RMSNorm "
                             "unfused vs fused (GPUs)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=4096, help="values per token (Llama-3.1-8B: 4096)")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256", help="tokens per all-reduce")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=run_all_reduce)
