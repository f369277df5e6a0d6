"""Mixed-step CUDA graphs against the eager forward, per step shape, on dummy weights (GPU).

usage: python tools/mixed_graph_bench.py [MODEL] [--max-cudagraph-tokens N] [--profile [--top K]] [--case P,D,CTX ...]
       [--json PATH]

For each case (prefill tokens, decode rows, decode context) it times the eager forward and the runner's
MixedStepGraphs.run (buffer copies, padding and replay of the smallest bucket holding the step), in ms per
step of device time, and prints the bucket and its padding. Sampling is excluded (outside the graphs).
--profile adds the graph replay's costliest kernels: with the Triton prefill kernel serving graph-bound
metadata, its grid is (S, cdiv(T, BLOCK_Q), kv heads) whatever the step, so its share shows what the padded
sequence slots cost (what a unified attention kernel, gridded by T, would save).
The engine's own capture (allocate_kv_cache) builds the graphs; MODEL defaults to llama-3.1-8b.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from meshserve import LLM, SamplingParams
from meshserve.engine.scheduler_output import ScheduledSequence

# W3-like mixed steps first (52 decode rows at ~600 context + a 224-token prefill chunk), then heavier ones
CASES = [(224, 52, 600), (1024, 200, 600), (64, 100, 600), (480, 30, 1200), (128, 8, 300)]


def batch(prefill: int, decode_rows: int, ctx: int, block_size: int) -> list[ScheduledSequence]:
    params = SamplingParams(temperature=0)
    seqs, next_block = [], 0

    def blocks(n_tokens: int) -> list[int]:
        nonlocal next_block
        n = -(-n_tokens // block_size)
        next_block += n
        return list(range(next_block - n, next_block))

    for i in range(decode_rows):
        seqs.append(ScheduledSequence(f"d{i}", [7], ctx - 1, blocks(ctx), params, True))
    if prefill:
        seqs.append(ScheduledSequence("p", [11] * prefill, 0, blocks(prefill), params, True))
    return seqs


def gpu_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def wall_ms(fn, iters: int = 20) -> float:
    """Host-inclusive time per step (what the engine loop sees when it waits on each step)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def top_kernels(fn, iters: int = 5, k: int = 6) -> list[tuple[str, float, int]]:
    """(name, ms per step, launches per step) of the costliest kernels fn runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    stats = [
        (e.key[:60], round(e.device_time_total / iters / 1e3, 3), e.count // iters)
        for e in prof.key_averages()
        if e.device_time_total > 0
    ]
    return sorted(stats, key=lambda s: -s[1])[:k]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="llama-3.1-8b")
    ap.add_argument("--max-cudagraph-tokens", type=int, default=2048)
    ap.add_argument("--profile", action="store_true", help="list the graph replay's costliest kernels")
    ap.add_argument("--json", default=None)
    ap.add_argument("--case", action="append", default=None, metavar="P,D,CTX",
                    help="prefill tokens, decode rows, decode context (repeatable; default: the W3-like CASES), "
                         "e.g. 1014,254,700: W3's steps past the knee")
    ap.add_argument("--top", type=int, default=6, help="--profile: how many kernels to list")
    ns = ap.parse_args()
    cases = [tuple(int(v) for v in c.split(",")) for c in ns.case] if ns.case else CASES
    t0 = time.perf_counter()
    llm = LLM(
        model=ns.model,
        load_format="dummy",
        dtype="bfloat16",
        max_model_len=4096,
        max_cudagraph_tokens=ns.max_cudagraph_tokens,
    )
    print(f"engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
    runner = llm.engine.runner
    graphs = runner.mixed_graphs
    if graphs is None:
        raise SystemExit("no mixed-step graphs were captured (see the log for why)")
    print(f"buckets: {graphs.buckets}", flush=True)
    rows = []
    for prefill, decode_rows, ctx in cases:
        seqs = batch(prefill, decode_rows, ctx, runner.block_size)
        input_ids, positions, meta = runner._prepare(seqs)
        tokens = int(input_ids.shape[0])
        if not graphs.can_run(tokens, meta):
            print(f"skip {prefill}+{decode_rows}: {tokens} tokens exceed the largest bucket", flush=True)
            continue

        def eager(input_ids=input_ids, positions=positions, meta=meta):
            return runner.forward(input_ids, positions, meta)

        def graph(input_ids=input_ids, positions=positions, meta=meta):
            return graphs.run(input_ids, positions, meta)

        g, e = graph().float(), eager().float()  # bf16 over every layer: split counts and kernels differ
        row = {
            "max_abs_diff": round((g - e).abs().max().item(), 4),
            "rel_err": round(((g - e).norm() / e.norm()).item(), 5),
            "prefill": prefill,
            "decode_rows": decode_rows,
            "ctx": ctx,
            "tokens": tokens,
            "bucket": graphs.bucket_for(tokens, meta.num_seqs),
            "eager_ms": round(gpu_ms(eager), 3),
            "graph_ms": round(gpu_ms(graph), 3),
            "eager_wall_ms": round(wall_ms(eager), 3),
            "graph_wall_ms": round(wall_ms(graph), 3),
        }
        row["speedup_wall"] = round(row["eager_wall_ms"] / row["graph_wall_ms"], 2)
        if ns.profile:
            row["graph_top_kernels"] = top_kernels(graph, k=ns.top)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(
                {
                    "model": ns.model,
                    "gpu": torch.cuda.get_device_name(),
                    "buckets": graphs.buckets,
                    "rows": rows,
                },
                f,
                indent=1,
            )
    llm.shutdown()


if __name__ == "__main__":
    main()
