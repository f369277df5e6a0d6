"""Where the start-up's graph captures spend their time (issue 29: "mixed graphs 2.4 s, decode graphs 1.0-1.3 s" of
a 7 s engine core on a warm machine), and what capturing without the per-graph eager warm-up, or without the
allocator's empty_cache at every capture's entry, would save.

After the engine is up (its graphs captured as at start), every mixed-step and decode graph is captured again
three ways, phase by phase (host seconds, summed over the graphs):
  A  every graph after an eager warm-up run (the engine's plain path, MESHSERVE_CAPTURE_WARMUP=1): warm-up run,
     synchronize, torch.cuda.graph enter (synchronize + empty_cache), the captured forward, capture end
  B  no warm-up run (every kernel was built by A; what the engine now does for every graph but a ladder's first,
     cuda_graph.capture_graph with engine/capture_guard.py)
  C  B with empty_cache a no-op during the captures
then a few graphs of C are replayed against A's outputs (bit-equal expected: same kernels, same inputs).

usage (device): python tools/capture_probe.py [MODEL] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

PHASES = ("warm-up", "sync", "enter", "forward", "end")


@contextlib.contextmanager
def no_empty_cache():
    saved = torch.cuda.empty_cache, torch._C._host_emptyCache
    torch.cuda.empty_cache = lambda: None
    torch._C._host_emptyCache = lambda: None
    try:
        yield
    finally:
        torch.cuda.empty_cache, torch._C._host_emptyCache = saved


def capture_all(holder, args_of, warm: bool, pool) -> tuple[dict, dict, dict]:
    """Capture every (key, args) of args_of() into pool; per-phase host seconds summed, graphs, outputs."""
    times = dict.fromkeys(PHASES, 0.0)
    graphs, outputs = {}, {}
    for key, args in args_of():
        t0 = time.perf_counter()
        if warm:
            holder.forward(*args)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        ctx = torch.cuda.graph(graph, pool=pool)
        ctx.__enter__()
        t3 = time.perf_counter()
        out = holder.forward(*args)
        t4 = time.perf_counter()
        ctx.__exit__(None, None, None)
        t5 = time.perf_counter()
        for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            times[phase] += dt
        graphs[key], outputs[key] = graph, out
    torch.cuda.synchronize()
    return times, graphs, outputs


def reset(graphs: dict) -> None:
    torch.cuda.synchronize()
    for g in graphs.values():
        g.reset()
    graphs.clear()


@torch.inference_mode()
def probe(name: str, holder, args_of) -> dict:
    keys = [k for k, _ in args_of()]
    check = [keys[0], keys[len(keys) // 2], keys[-1]]
    reference = {}
    for k in check:  # the engine's own graphs, replayed on the static (all-padding) inputs
        holder.graphs[k].replay()
        reference[k] = holder.outputs[k].clone()
    pool = holder.pool
    result = {"graphs": len(keys)}
    kept = None
    for variant, warm, no_free in (("A", True, False), ("B", False, False), ("C", False, True)):
        with no_empty_cache() if no_free else contextlib.nullcontext():
            t0 = time.perf_counter()
            times, graphs, outputs = capture_all(holder, args_of, warm, pool)
            total = time.perf_counter() - t0
        result[variant] = {"total_s": round(total, 3), **{p: round(s, 3) for p, s in times.items()}}
        print(f"{name} {variant}: {len(keys)} graphs in {total:.2f} s  "
              + "  ".join(f"{p} {s:.2f}" for p, s in times.items()), flush=True)
        if variant == "C":
            kept = graphs, outputs
        else:
            reset(graphs)
    graphs, outputs = kept
    diffs = {}
    for k in check:
        graphs[k].replay()
        torch.cuda.synchronize()
        diffs[str(k)] = (outputs[k].float() - reference[k].float()).abs().max().item()
    result["C_vs_engine_max_abs_diff"] = diffs
    print(f"{name} C against the engine's graphs (max |diff|): {diffs}", flush=True)
    reset(graphs)
    return result


def main() -> None:
    from meshserve import LLM

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="llama-3.1-8b")
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    t0 = time.perf_counter()
    llm = LLM(model=ns.model, load_format="dummy", dtype="bfloat16")
    print(f"engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
    runner = llm.engine.runner
    out = {"model": ns.model, "gpu": torch.cuda.get_device_name()}
    if runner.mixed_graphs is not None:
        mg = runner.mixed_graphs
        out["mixed"] = probe("mixed", mg, mg._capture_args)
    if runner.graphs is not None:
        dg = runner.graphs
        out["decode"] = probe("decode", dg, dg._capture_args)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
