"""Where a W1 decode token's time goes outside its CUDA graph: the GPU's work and idle time between two replays
of the batch-1 decode graph, and whether the host was late for it (issued after the end: > 0).

usage: python tools/w1_gaps.py [MODEL] [--tokens N] [--trace PATH]

W1 on Qwen3-0.6B (PDL on) replays a 0.79 ms graph but takes 0.92-1.05 ms a token, a different figure in every
process; with PDL off the graph takes 1.04 ms and a token a steady 1.16 (2026-12-02, BENCHMARKS.md
"Twenty-second session"). The engine is built as `meshserve bench latency` builds it; a generation of N tokens
runs under torch.profiler (CUDA activity: kernels, copies and the runtime calls that launched them), and
each step is cut at its cudaGraphLaunch. For the gap between graph k's last kernel and graph k+1's first it
prints the GPU's busy time outside graphs (by kernel / copy name), its idle time, and how late the host issued
the first GPU work after graph k (> 0: the GPU waited for the host). Medians and p90 over the steps, then
the runtime calls per step with their host time (cudaEventSynchronize is the host waiting for the GPU).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def analyse(trace: dict) -> None:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    runtime = {e["args"]["correlation"]: e for e in events
               if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    launches = sorted((e for e in runtime.values() if e["name"] == "cudaGraphLaunch"), key=lambda e: e["ts"])
    graph_of = {e["args"]["correlation"]: i for i, e in enumerate(launches)}
    spans = collections.defaultdict(lambda: [float("inf"), 0.0])
    for e in gpu:
        k = graph_of.get(e["args"].get("correlation"))
        if k is not None:
            spans[k][0] = min(spans[k][0], e["ts"])
            spans[k][1] = max(spans[k][1], e["ts"] + e["dur"])
    steps = sorted(k for k in spans if k + 1 in spans)
    graph_us, busy_us, idle_us, late_us, gap_us, next_us = [], [], [], [], [], []
    outside = collections.Counter()
    outside_n = collections.Counter()
    for k in steps:
        end, nxt = spans[k][1], spans[k + 1][0]
        gap_us.append(nxt - end)
        graph_us.append(spans[k][1] - spans[k][0])
        inside = [e for e in gpu if end <= e["ts"] < nxt and graph_of.get(e["args"].get("correlation")) is None]
        busy = sum(e["dur"] for e in inside)
        busy_us.append(busy)
        idle_us.append(nxt - end - busy)
        for e in inside:
            outside[e["name"][:70]] += e["dur"]
            outside_n[e["name"][:70]] += 1
        first = inside[0] if inside else None
        issued = (runtime[first["args"]["correlation"]]["ts"] if first is not None
                  and first["args"].get("correlation") in runtime else launches[k + 1]["ts"])
        late_us.append(issued - end)
        next_us.append(launches[k + 1]["ts"] - end)
    n = len(steps)
    print(f"steps {n}: per step, microseconds (median / p10 / p90)")
    for name, vals in (("graph span", graph_us), ("gap between graphs", gap_us), ("GPU busy in the gap", busy_us),
                       ("GPU idle in the gap", idle_us), ("first work issued after end", late_us),
                       ("next graph launched after end", next_us)):
        print(f"  {name:<28} {statistics.median(vals):9.1f} {pct(vals, 0.1):9.1f} {pct(vals, 0.9):9.1f}")
    print("GPU work between graphs (per step: count, us):")
    for name, dur in outside.most_common(15):
        print(f"  {outside_n[name] / max(n, 1):5.1f} x {dur / max(n, 1):8.1f}  {name}")
    # host side: each runtime call's host time, summed per step (per name)
    host = collections.Counter()
    host_n = collections.Counter()
    t0, t1 = launches[steps[0]]["ts"], launches[steps[-1] + 1]["ts"]
    for e in runtime.values():
        if t0 <= e["ts"] < t1:
            host[e["name"]] += e["dur"]
            host_n[e["name"]] += 1
    per_launch = [launches[k + 1]["ts"] - launches[k]["ts"] for k in steps]
    print(f"host: graph launch to graph launch {statistics.median(per_launch):.1f} us median "
          f"(p10 {pct(per_launch, 0.1):.1f}, p90 {pct(per_launch, 0.9):.1f}); runtime calls per step:")
    for name, dur in host.most_common(15):
        print(f"  {host_n[name] / n:5.1f} x {dur / n:8.1f} us  {name}")


def host_parts(llm, gen, tokens: int = 256) -> None:
    """Wall time per step of the engine's parts on the host, unprofiled (perf_counter around each method)."""
    from meshserve.engine.runner_output import PendingOutput

    core = llm.engine.core
    runner = core.executor.runner
    sums = collections.Counter()
    restore = []

    def timed(obj, attr, name):
        fn = getattr(obj, attr)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sums[name] += time.perf_counter() - t
        restore.append((obj, attr, fn))
        setattr(obj, attr, wrapper)

    for obj, attr, name in ((llm.engine, "step", "engine.step"), (core, "step", "core.step"),
                            (core, "_schedule", "schedule"), (core.executor, "execute_async", "launch"),
                            (runner, "_prepare", "launch.prepare"), (runner, "_run_forward", "launch.graph"),
                            (runner.sampling, "sample", "launch.sample"), (core, "_drain", "drain"),
                            (PendingOutput, "result", "drain.wait"), (core, "_process", "drain.process"),
                            (core, "_outputs", "outputs")):
        timed(obj, attr, name)
    import torch

    torch.cuda.synchronize()
    t = time.perf_counter()
    gen(tokens)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    for obj, attr, fn in reversed(restore):
        setattr(obj, attr, fn)
    print(f"host parts over {tokens} tokens ({tokens / wall:.1f} tok/s, {1e6 * wall / tokens:.1f} us a token), "
          "us per token:")
    for name in ("engine.step", "core.step", "schedule", "launch", "launch.prepare", "launch.graph",
                 "launch.sample", "drain", "drain.wait", "drain.process", "outputs"):
        print(f"  {name:<16} {1e6 * sums[name] / tokens:8.1f}")


def graph_launch_us(llm, replays: int = 100) -> None:
    """Host time of one cudaGraphLaunch of the batch-1 decode graph (the GPU idle before each launch)."""
    import torch

    from meshserve.bench.offline import _decode_graph_ms
    from meshserve.bench.workloads import W1_NEW_TOKENS, w1_prompt

    holder = llm.engine.runner.graphs
    graph = holder.greedy_step_graph(1, len(w1_prompt()) + W1_NEW_TOKENS)  # the one W1 replays
    host = []
    for _ in range(replays):
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        host.append(1e6 * (time.perf_counter() - t))
    torch.cuda.synchronize()
    print(f"decode graph: replay() host time {statistics.median(host):.1f} us median (p90 {pct(host, 0.9):.1f}); "
          f"device time back to back {1e3 * _decode_graph_ms(llm, len(w1_prompt()) + W1_NEW_TOKENS):.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="qwen3-0.6b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--trace", help="keep the chrome trace here")
    ns = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from meshserve import SamplingParams
    from meshserve.bench.offline import _llm
    from meshserve.bench.workloads import w1_prompt
    from meshserve.cli import build_parser

    bench_ns = build_parser().parse_args(["bench", "latency", "--model", ns.model, "--no-baseline"])
    llm = _llm(bench_ns)
    prompt = [{"prompt_token_ids": w1_prompt()}]

    def gen(n):
        return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)

    gen(8)
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        gen(256)
        torch.cuda.synchronize()
        print(f"unprofiled: {256 / (time.perf_counter() - t):.1f} tok/s")
    host_parts(llm, gen)
    graph_launch_us(llm)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen(ns.tokens)
        torch.cuda.synchronize()
    path = ns.trace or os.path.join(tempfile.mkdtemp(), "w1.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        analyse(json.load(f))


if __name__ == "__main__":
    main()
