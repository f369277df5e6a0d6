"""Where a mixed (prefill + decode) step's time goes on the GPU: the eager forward against a CUDA graph
captured for that exact batch, the host's launch time of the eager forward, and its kernels by device time.

usage: python tools/mixed_step_probe.py [MODEL] [--json PATH]

Cases are (prefill tokens, decode rows, decode context): W3-like mixed steps, a pure prefill chunk and a
pure decode batch. The graph here is captured for one batch only (an upper bound on what mixed-step graphs
can save); the forward excludes sampling.
"""

import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from meshserve import LLM, SamplingParams
from meshserve.engine.scheduler_output import ScheduledSequence

CASES = [(224, 52, 600), (1024, 200, 600), (512, 0, 0), (0, 64, 600), (256, 0, 0), (0, 200, 600)]


def batch(prefill: int, decode_rows: int, ctx: int, block_size: int):
    params = SamplingParams(temperature=0)
    seqs, next_block = [], 0

    def blocks(n_tokens):
        nonlocal next_block
        n = -(-n_tokens // block_size)
        out = list(range(next_block, next_block + n))
        next_block += n
        return out

    for i in range(decode_rows):
        seqs.append(ScheduledSequence(f"d{i}", [7], ctx - 1, blocks(ctx), params, True))
    if prefill:
        seqs.append(ScheduledSequence("p", [11] * prefill, 0, blocks(prefill), params, True))
    return seqs


def gpu_ms(fn, iters=20):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@torch.inference_mode()
def main():
    model = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "llama-3.1-8b"
    out_path = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    llm = LLM(model=model, load_format="dummy", dtype="bfloat16", max_model_len=4096)
    runner = llm.engine.runner
    rows = []
    for prefill, decode_rows, ctx in CASES:
        seqs = batch(prefill, decode_rows, ctx, runner.block_size)
        input_ids, positions, meta = runner._prepare(seqs)

        def fn(input_ids=input_ids, positions=positions, meta=meta):
            return runner.forward(input_ids, positions, meta)

        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            fn()
        host_ms = (time.perf_counter() - t) / 10 * 1e3  # launch-bound if close to the eager step time
        torch.cuda.synchronize()
        eager = gpu_ms(fn)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        replay = gpu_ms(graph.replay)
        del graph
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        kernels = sorted(
            (
                (e.key, e.device_time_total / 5 / 1e3, e.count // 5)
                for e in prof.key_averages()
                if e.device_time_total > 0
            ),
            key=lambda k: -k[1],
        )
        kernel_ms = sum(k[1] for k in kernels)
        row = {
            "prefill": prefill,
            "decode_rows": decode_rows,
            "ctx": ctx,
            "tokens": int(input_ids.shape[0]),
            "eager_ms": round(eager, 3),
            "graph_ms": round(replay, 3),
            "host_launch_ms": round(host_ms, 3),
            "kernel_sum_ms": round(kernel_ms, 3),
            "launches": sum(k[2] for k in kernels),
            "top": [(n[:70], round(ms, 3), c) for n, ms, c in kernels[:12]],
        }
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)
    llm.shutdown()


if __name__ == "__main__":
    main()
