"""Where DeepSeek-V2-Lite's decode step goes, MLA attention first (one GPU, bf16, dummy weights, CUDA graphs).

1. layer: the whole MLA attention path (DeepseekAttention: q_proj, kv_a_proj, prologue, absorbed matmuls,
   decode kernel, reduce, o_proj) at V2-Lite's shapes, 27 calls in one graph (a step's worth), at batch 1 / 64
   / 256 x context 800 and 4,096 and W2's mix (contexts 100-2,048), on each path of PATHS: legacy
   (MESHSERVE_MLA_LEGACY=1), split (MESHSERVE_MLA_BALANCED=0: the default before 2026-12-01), balanced
   (MESHSERVE_MLA_BALANCED=1), auto (the default: kernels/mla_decode_choice.py), auto+prefetch
   (MESHSERVE_MLA_PREFETCH=1), auto+transposed (MESHSERVE_MLA_TRANSPOSED=1) and auto+pipelined
   (MESHSERVE_MLA_DECODE_KERNEL=pipelined): time per layer, per-kernel device time (torch.profiler over graph replays),
   the decode kernel's achieved KV bandwidth (576 x 2 B per context token).
2. sweep: the decode kernels alone, (BLOCK_N, num_warps, num_stages) and the tile loops ("pf": prefetching,
   "tr": transposed, "pl": pipelined, kernels/triton_mla_pipelined.py; its balanced launch's default program
   count: as many as fit on an SM)
   x splits (split kernel) or program counts (balanced kernel) at the same shapes (the candidates for
   kernels/mla_decode_choice.py, triton_mla._decode_config and mla_num_splits; MESHSERVE_MLA_DECODE_TILE=N,W,S
   tries one in the engine).
3. model: deepseek-v2-lite's whole decode step (LLM, dummy weights) at batch 256 x context 800 and W2's mix,
   and batch 1, replayed from a graph, on each path of PATHS: the step, all 27 attention blocks alone, all
   27 MLP/MoE blocks alone (each its own graph, same inputs), the rest by difference, and the step's top
   kernels by device time.

usage: python tools/bench_mla_decode.py [--json PATH] [--only layer,sweep,model (run in this order)] [--graph-bound N]
       [--shapes 256x800,256xw2mix (layer and sweep: only these batch x context shapes)]

--graph-bound: the max_seq_len the decode graphs are captured with (the engine uses max_model_len: 163,840 for
V2-Lite unless --max-model-len is given; it sets the split count). Default 4,096. One H200: ~2 min in all.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import random
import time
import types

import torch
from torch.profiler import ProfilerActivity, profile

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.layers.backend_selection import KernelSelection

HIDDEN, HEADS, NOPE, ROPE, V_DIM, RANK, BLOCK_SIZE, LAYERS = 2048, 16, 128, 64, 128, 512, 16, 27
ROW_BYTES = (RANK + ROPE) * 2
DEV, DTYPE = "cuda", torch.bfloat16
# 96: W2's tail band (67-131 sequences) where the MLA split rule differs from the generic one
SHAPES = [(1, 800), (64, 800), (96, 800), (256, 800), (1, 4096), (64, 4096), (256, 4096), (256, "w2mix")]
SWEEP_SHAPES = [(1, 800), (16, 800), (32, 800), (64, 800), (96, 800), (256, 800), (256, "w2mix")]
# (BLOCK_N, num_warps, num_stages, loop): loop "" the plain tile loop, "pf" the prefetching one
# (kernels/triton_mla_prefetch.py), "tr" the transposed one (kernels/triton_mla_transposed.py), "pl" the
# pipelined one (kernels/triton_mla_pipelined.py: num_stages - 1 latent buffers; sm_90 static facts:
# tools/mla_decode_sass.py); None: the kernel's default (kernels/mla_decode_choice.py)
TILES = [None, (32, 4, 2, ""), (32, 8, 2, ""), (64, 4, 2, ""), (64, 8, 2, ""), (16, 4, 2, ""),
         (32, 4, 1, "pf"), (32, 8, 1, "pf"), (16, 4, 1, "pf"), (16, 8, 1, "pf"), (64, 4, 2, "tr"), (64, 8, 2, "tr"),
         (32, 4, 3, "pl"), (16, 4, 4, "pl"), (16, 4, 5, "pl"), (32, 8, 3, "pl"), (32, 4, 4, "pl"), (64, 4, 3, "pl"),
         (64, 8, 3, "pl")]
LOOP_FLAGS = {"": {}, "pf": {"prefetch": True}, "tr": {"transposed": True}, "pl": {"pipelined": True}}


ONLY_SHAPES: set[str] = set()  # --shapes: "BATCHxCONTEXT" labels (e.g. 256x800, 256xw2mix); empty: every shape


def wanted(shapes: list) -> list:
    """The shapes of a part that --shapes keeps (all without it)."""
    return [(b, c) for b, c in shapes if not ONLY_SHAPES or f"{b}x{c}" in ONLY_SHAPES]


def context_lens(batch: int, ctx) -> list[int]:
    if ctx == "w2mix":  # W2's mid-run contexts: prompt 100-1,024 plus up to 1,024 generated
        rnd = random.Random(0)
        return [rnd.randint(100, 1024) + rnd.randint(0, 1024) for _ in range(batch)]
    return [ctx] * batch


def decode_meta(seq_lens: list[int], bound: int, first_block: int = 0, seed: int = 0) -> AttentionMetadata:
    """One decode row per sequence on shuffled blocks from first_block on; max_seq_len = the graph's bound."""
    blocks = [-(-s // BLOCK_SIZE) for s in seq_lens]
    g = torch.Generator().manual_seed(seed)
    perm = (torch.randperm(sum(blocks), generator=g) + first_block).tolist()
    tables, slots, used = [], [], 0
    for s, n in zip(seq_lens, blocks):
        tables.append(perm[used:used + n] + [0] * (max(blocks) - n))
        used += n
        slots.append(tables[-1][(s - 1) // BLOCK_SIZE] * BLOCK_SIZE + (s - 1) % BLOCK_SIZE)
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=DEV)
    b = len(seq_lens)
    return AttentionMetadata(slot_mapping=t(slots), query_start_loc=t(list(range(b + 1))), seq_lens=t(seq_lens),
                             block_tables=t(tables), max_query_len=1, max_seq_len=bound,
                             query_start_loc_cpu=list(range(b + 1)), seq_lens_cpu=list(seq_lens))


def graph_of(fn, reps: int = 1) -> torch.cuda.CUDAGraph:
    fn()  # warm up (JIT)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    torch.cuda.synchronize()
    return g


def time_graph(g: torch.cuda.CUDAGraph, iters: int = 20) -> float:
    """Median ms of one replay."""
    g.replay()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def kernel_times(g: torch.cuda.CUDAGraph, replays: int = 3, top: int = 30) -> list[dict]:
    """Device time per kernel name (us per replay) over a few replays, largest first."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / replays, e.count / replays) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    return [{"kernel": k[:120], "us": round(us, 2), "calls": round(n, 1)} for k, us, n in rows[:top]]


def kernel_class(name: str) -> str:
    n = name.lower()
    if "mla" in n or "decode_reduce" in n or "write_latent" in n:
        return "mla_attention_kernels"
    if "moe" in n or "expert" in n:
        return "moe_kernels"
    if any(k in n for k in ("gemm", "gemv", "cutlass", "xmma", "nvjet", "sm90", "cublas")):
        return "gemm"
    if "norm" in n:
        return "norm"
    if "rotary" in n or "rope" in n:
        return "rotary"
    if "elementwise" in n or "vectorized" in n or "copy" in n or "cat" in n or "index" in n:
        return "torch_elementwise_copy_index"
    return "other"


def by_class(kernels: list[dict]) -> dict:
    out: dict[str, float] = {}
    for k in kernels:
        c = kernel_class(k["kernel"])
        out[c] = round(out.get(c, 0.0) + k["us"], 1)
    return out


def v2_lite_attention():
    from meshserve.layers.rotary import RotaryEmbedding
    from meshserve.models.deepseek import DeepseekAttention

    cfg = types.SimpleNamespace(hidden_size=HIDDEN, num_attention_heads=HEADS, qk_nope_head_dim=NOPE,
                                qk_rope_head_dim=ROPE, v_head_dim=V_DIM, kv_lora_rank=RANK, q_lora_rank=None,
                                attention_bias=False, rope_interleave=True, rope_scaling=None, rope_theta=10000.0,
                                max_position_embeddings=8192)
    with torch.device(DEV):
        attn = DeepseekAttention(cfg, RotaryEmbedding(cfg, ROPE, 8192)).to(DTYPE)
    for p in attn.parameters():
        p.requires_grad_(False)
        p.data.normal_(0, 0.02)
    attn.kv_a_layernorm.weight.data.fill_(1.0)
    return attn


# what select_kernels gives a bf16 model on a GPU (fused ops, GEMV, graphs)
ENGINE_SELECTION = KernelSelection(attention_backend="triton", fused_ops=True, fused_prologue=True, gemv=True,
                                   fused_sampler=True, cuda_graphs=True, kv_cache_dtype=DTYPE)


# the A/B paths, (legacy, balanced, loop): MESHSERVE_MLA_LEGACY=1, MESHSERVE_MLA_BALANCED=0 (the split
# kernel: the default before 2026-12-01), MESHSERVE_MLA_BALANCED=1, the default (by batch size),
# MESHSERVE_MLA_PREFETCH=1, MESHSERVE_MLA_TRANSPOSED=1, MESHSERVE_MLA_DECODE_KERNEL=pipelined
PATHS = {"legacy": (True, False, ""), "split": (False, False, ""), "balanced": (False, True, ""),
         "auto": (False, None, ""), "auto_prefetch": (False, None, "pf"), "auto_transposed": (False, None, "tr"),
         "auto_pipelined": (False, None, "pl")}


def bind(model, legacy: bool, base: KernelSelection | None = None, balanced: bool | None = False,
         loop: str = "") -> None:
    """Every layer's selection (base, or its own) with MESHSERVE_MLA_LEGACY's / _BALANCED's / _PREFETCH's /
    _TRANSPOSED's / _DECODE_KERNEL's switches set (balanced None: by batch size; loop "", "pf", "tr" or "pl")."""
    for m in model.modules():
        if isinstance(getattr(m, "kernels", None), KernelSelection):
            m.kernels = dataclasses.replace(base or m.kernels, mla_legacy=legacy, mla_balanced=balanced,
                                            mla_prefetch=loop == "pf", mla_transposed=loop == "tr",
                                            mla_decode_kernel="pipelined" if loop == "pl" else "default")


@torch.inference_mode()
def bench_layer(bound: int) -> list[dict]:
    attn = v2_lite_attention()
    results = []
    for batch, ctx in wanted(SHAPES):
        lens = context_lens(batch, ctx)
        blocks = sum(-(-s // BLOCK_SIZE) for s in lens)
        attn.attn.kv_cache = torch.randn(1, blocks, BLOCK_SIZE, 1, RANK + ROPE, device=DEV, dtype=DTYPE)
        meta = decode_meta(lens, bound)
        positions = torch.tensor([s - 1 for s in lens], device=DEV) % 8192
        hidden = torch.randn(batch, HIDDEN, device=DEV, dtype=DTYPE)
        row = {"batch": batch, "context": ctx, "kv_bytes_per_layer": sum(lens) * ROW_BYTES}
        outs = {}
        for name, (legacy, balanced, loop) in PATHS.items():
            bind(attn, legacy, ENGINE_SELECTION, balanced, loop)
            outs[name] = attn(positions, hidden, meta).float()
            g = graph_of(functools.partial(attn, positions, hidden, meta), reps=LAYERS)
            ms = time_graph(g) / LAYERS
            kernels = kernel_times(g)
            for k in kernels:
                k["us"] = round(k["us"] / LAYERS, 2)
                k["calls"] = round(k["calls"] / LAYERS, 1)
            dec = sum(k["us"] for k in kernels if "_mla_decode_split" in k["kernel"] or "_mla_balanced_k" in k["kernel"])
            row[name] = {"us_per_layer": round(ms * 1e3, 2), "us_per_step_27_layers": round(ms * 1e3 * LAYERS, 1),
                         "kernels_per_layer": round(sum(k["calls"] for k in kernels), 1),
                         "decode_kernel_us": round(dec, 2),
                         "decode_kernel_TBps": round(row["kv_bytes_per_layer"] / (dec * 1e-6) / 1e12, 2) if dec else None,
                         "kernels": kernels}
            del g
        for name in PATHS:
            if name != "legacy":
                row[f"max_abs_diff_{name}_vs_legacy"] = (outs[name] - outs["legacy"]).abs().max().item()
                row[f"speedup_{name}"] = round(row["legacy"]["us_per_layer"] / row[name]["us_per_layer"], 3)
        print(f"layer b={batch} ctx={ctx}: us/layer " + ", ".join(f"{n} {row[n]['us_per_layer']}" for n in PATHS)
              + "; decode kernel us (TB/s) " + ", ".join(f"{n} {row[n]['decode_kernel_us']} ({row[n]['decode_kernel_TBps']})"
                                                    for n in PATHS)
              + f"; max diff vs legacy {max(row[f'max_abs_diff_{n}_vs_legacy'] for n in PATHS if n != 'legacy'):.3g}",
              flush=True)
        results.append(row)
    return results


@torch.inference_mode()
def bench_sweep(bound: int) -> list[dict]:
    from triton.runtime.errors import OutOfResources

    from meshserve.kernels.mla_decode_choice import use_balanced
    from meshserve.kernels.triton_mla import mla_decode
    from meshserve.kernels.triton_mla_balanced import mla_decode_balanced

    results = []
    for batch, ctx in wanted(SWEEP_SHAPES):
        lens = context_lens(batch, ctx)
        blocks = sum(-(-s // BLOCK_SIZE) for s in lens)
        cache = torch.randn(1, blocks, BLOCK_SIZE, 1, RANK + ROPE, device=DEV, dtype=DTYPE)
        meta = decode_meta(lens, bound)
        q_lat = torch.randn(batch, HEADS, RANK, device=DEV, dtype=DTYPE)
        q_pe = torch.randn(batch, HEADS, ROPE, device=DEV, dtype=DTYPE)
        args = (q_lat, q_pe, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.07, bound)
        ref = mla_decode(*args).float()
        nbytes = sum(lens) * ROW_BYTES
        splits = [None, 1, 2] if batch > 64 else [None, 2, 8] if batch > 1 else [None, 8, 32, 64]
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        # the balanced kernel: its default program count (2 per SM; the pipelined loop's: as many as fit), and 1
        # and 3 per SM at batch 256 (and 2 for the pipelined loop, whose default may be 1)
        for tile_pf in TILES:
            tile, loop = (tile_pf[:3], tile_pf[3]) if tile_pf else (None, "")
            flags = LOOP_FLAGS[loop]
            per_sm = ((None, 1, 2, 3) if loop == "pl" else (None, 1, 3)) if batch == 256 else (None,)
            runs = [("split", s) for s in splits] + [("balanced", n and n * sms) for n in per_sm]
            for kind, s in runs:
                if kind == "split":
                    fn = functools.partial(mla_decode, *args, num_splits=s, tile=tile, **flags)
                else:
                    fn = functools.partial(mla_decode_balanced, *args[:7], num_programs=s, tile=tile, **flags)
                try:
                    err = (fn().float() - ref).abs().max().item()
                    g = graph_of(fn, reps=LAYERS)
                    us = time_graph(g) / LAYERS * 1e3
                    del g
                except (OutOfResources, RuntimeError) as e:  # a tile that does not fit
                    results.append({"batch": batch, "context": ctx, "kernel": kind, "tile": tile_pf, "splits": s,
                                    "error": str(e)[:200]})
                    continue
                label = "default" if tile_pf is None else ",".join(map(str, tile)) + (f" {loop}" if loop else "")
                results.append({"batch": batch, "context": ctx, "kernel": kind, "tile": label,
                                "splits": s or "auto", "us_incl_reduce": round(us, 2),
                                "TBps": round(nbytes / (us * 1e-6) / 1e12, 2), "max_abs_err": err})
        best = min((r for r in results if r.get("batch") == batch and r.get("context") == ctx and "us_incl_reduce" in r),
                   key=lambda r: r["us_incl_reduce"])
        mine = [r for r in results if r.get("batch") == batch and r.get("context") == ctx
                and r.get("tile") == "default" and r.get("splits") == "auto"]
        old = next(r for r in mine if r["kernel"] == "split")  # the default before 2026-12-01 (4 warps now at >= 1 wave)
        default = next(r for r in mine if r["kernel"] == ("balanced" if use_balanced(batch, None) else "split"))
        print(f"sweep b={batch} ctx={ctx}: split {old['us_incl_reduce']} us, default {default['kernel']}"
              f" {default['us_incl_reduce']} us ({default['TBps']} TB/s), best"
              f" {best['kernel']} {best['tile']} splits/programs {best['splits']}: {best['us_incl_reduce']} us"
              f" ({best['TBps']} TB/s)", flush=True)
        pl = [r for r in results if r.get("batch") == batch and r.get("context") == ctx and "us_incl_reduce" in r
              and r["tile"].endswith(" pl")]
        for kind in ("split", "balanced"):  # the pipelined loop's best in each kernel
            runs = [r for r in pl if r["kernel"] == kind]
            if runs:
                b = min(runs, key=lambda r: r["us_incl_reduce"])
                print(f"  pipelined {kind}: best {b['tile']} splits/programs {b['splits']}: {b['us_incl_reduce']} us"
                      f" ({b['TBps']} TB/s)", flush=True)
    return results


def each_layer(layers, part: str, *args) -> None:
    """Every layer's attention (or MLP / MoE) block on the same inputs: that part of a step alone."""
    for layer in layers:
        getattr(layer, part)(*args)


@torch.inference_mode()
def bench_model(bound: int) -> list[dict]:
    from meshserve import LLM

    gc.collect()
    torch.cuda.empty_cache()  # the layer and sweep parts' caches, before the engine sizes its KV pool
    t0 = time.perf_counter()
    llm = LLM(model="deepseek-v2-lite", load_format="dummy", dtype="bfloat16", max_model_len=bound,
              max_num_seqs=256, enforce_eager=True)
    print(f"model loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    runner = llm.engine.runner
    model = runner.model
    layers = model.model.layers
    results = []
    for batch, ctx in ((256, 800), (256, "w2mix"), (1, 800)):
        lens = context_lens(batch, ctx)
        meta = decode_meta(lens, bound)
        ids = torch.randint(0, 300, (batch,), device=DEV)  # any ids: dummy weights
        positions = torch.tensor([s - 1 for s in lens], device=DEV)
        hidden = torch.randn(batch, HIDDEN, device=DEV, dtype=DTYPE) * 0.1
        row = {"batch": batch, "context": ctx}
        for name, (legacy, balanced, loop) in PATHS.items():
            bind(model, legacy, balanced=balanced, loop=loop)
            step = graph_of(functools.partial(runner.forward, ids, positions, meta))
            attn = graph_of(functools.partial(each_layer, layers, "self_attn", positions, hidden, meta))
            mlp = graph_of(functools.partial(each_layer, layers, "mlp", hidden))
            t_step, t_attn, t_mlp = time_graph(step), time_graph(attn), time_graph(mlp)
            kernels = kernel_times(step, top=40)
            row[name] = {"step_ms": round(t_step, 3), "attention_27_ms": round(t_attn, 3),
                         "mlp_moe_27_ms": round(t_mlp, 3), "rest_ms": round(t_step - t_attn - t_mlp, 3),
                         "kernel_classes_us": by_class(kernels), "top_kernels": kernels}
            if name == "auto":  # the LM head beside the step (outside the forward, and path-independent)
                head = graph_of(functools.partial(model.compute_logits, hidden))
                row["lm_head_ms"] = round(time_graph(head), 3)
                del head
            print(f"model b={batch} ctx={ctx} {name}: step {t_step:.2f} ms = attention {t_attn:.2f} + MLP/MoE"
                  f" {t_mlp:.2f} + rest {t_step - t_attn - t_mlp:.2f}", flush=True)
            del step, attn, mlp
        results.append(row)
    bind(model, False, balanced=None)
    llm.shutdown()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="mla_decode.json")
    ap.add_argument("--only", default="layer,sweep,model")
    ap.add_argument("--graph-bound", type=int, default=4096)
    ap.add_argument("--shapes", default="", help="only these BATCHxCONTEXT shapes of layer/sweep, comma-separated "
                                                 "(e.g. 256x800,256xw2mix: the sweep of every shape takes > 3 min)")
    ns = ap.parse_args()
    ONLY_SHAPES.update(x for x in ns.shapes.split(",") if x)
    parts = ns.only.split(",")
    props = torch.cuda.get_device_properties(0)
    report = {"gpu": props.name, "sms": props.multi_processor_count, "graph_bound": ns.graph_bound,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    t0 = time.perf_counter()
    funcs = {"layer": bench_layer, "sweep": bench_sweep, "model": bench_model}
    for part in parts:  # in the order asked (a time limit keeps the parts already written)
        if part in funcs:
            report[part] = funcs[part](ns.graph_bound)
            report[f"{part}_s"] = round(time.perf_counter() - t0, 1)
            with open(ns.json, "w") as f:  # after each part: a timeout still leaves the finished ones
                json.dump(report, f, indent=1)
    print(f"wrote {ns.json} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
