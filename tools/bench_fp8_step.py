"""Where an fp8 decode step's time goes (issue 20): per kernel class, bf16 vs fp8 weights vs fp8 KV vs both (GPU).

usage: python tools/bench_fp8_step.py [--models llama-3.1-8b,qwen3-0.6b] [--variants bf16,fp8w,fp8kv,both]
       [--batch 256] [--ctx 800] [--json PATH] [--no-legacy] [--no-micro | --attention-only]
       [--attention-configs BLOCK_N,WARPS,STAGES;...]

For each model and variant: a ModelRunner on dummy weights (no profile run, no engine graphs), a W2-like decode
step (batch rows at context ctx) captured in one CUDA graph, then
  step_ms        device time per replay (the forward; the LM head and sampling are outside, equal in all)
  classes        ms and launches per step of each kernel class (torch.profiler over replays): gemm, act_quant
                 (the Triton fp8 quantization), norm+quant / silu+quant (fused with it), torch_elementwise (eager torch ops: the reference quantization
                 when it runs), norm, silu, prologue (fused q/k-norm + rotary + KV write), rotary, kv_write,
                 attention, other
  legacy         the same step with the paths this branch replaced, for the A/B in one run: fp8 weights with the
                 torch-op activation quantization after unfused norm / SiLU kernels, an fp8 cache without the fused prologue (the old decode
                 attention conversion is gone from the code: compare fp8kv's attention to bf16's instead)
Then (--no-micro skips) the activation quantization alone, torch reference vs Triton, at [batch, K] for the
projections' input widths (graph-replayed, device time), each projection as bf16 F.linear vs fp8 _scaled_mm
(is the fp8 GEMM itself faster at batch 256?), and a decode-attention tile sweep (BLOCK_N, warps, stages) for
the bf16 and fp8 caches at the models' head shapes (--attention-only: that sweep alone; --attention-configs: its
tiles). Prints a table per model; --json writes everything.
About 100-140 s on an H200 for both models and all variants.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from triton.runtime.errors import OutOfResources

from meshserve.config import EngineArgs
from meshserve.engine.engine_config import create_engine_config
from meshserve.engine.model_runner import ModelRunner
from meshserve.engine.scheduler_output import ScheduledSequence
from meshserve.kernels import fused as fused_ops
from meshserve.kernels import quant_ops
from meshserve.layers.attention import Attention
from meshserve.sampling import SamplingParams

VARIANTS = {  # name: (quantization, kv_cache_dtype)
    "bf16": (None, "auto"),
    "fp8w": ("fp8", "auto"),
    "fp8kv": (None, "fp8"),
    "both": ("fp8", "fp8"),
}
# kernel name fragments -> class (first match wins; lower-case)
CLASSES = [
    ("act_quant", ("_quantize_fp8_rows",)),
    ("norm+quant", ("_rms_norm_quant",)),
    ("silu+quant", ("_silu_and_mul_quant",)),
    ("prologue", ("_qkv_rope_cache",)),
    ("kv_write", ("_reshape_and_cache",)),
    ("rotary", ("_rotary_kernel",)),
    ("attention", ("_decode_split", "_decode_reduce", "attention")),
    ("norm", ("_rms_norm",)),
    ("silu", ("_silu_and_mul",)),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "scaled_mm", "sm90_", "f8f8")),
    ("torch_elementwise", ("elementwise", "reduce_kernel", "copy", "fill")),
]


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((cls for cls, frags in CLASSES if any(f in low for f in frags)), "other")


def graph_of(fn, reps: int = 1) -> torch.cuda.CUDAGraph:
    fn()  # warm up (Triton JIT, cuBLAS plans)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    torch.cuda.synchronize()
    return graph


def replay_ms(graph: torch.cuda.CUDAGraph, iters: int = 20) -> float:
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def profile_classes(graph: torch.cuda.CUDAGraph, iters: int = 3) -> tuple[dict, list]:
    """({class: {ms, launches}} per replay, the 8 costliest kernels) from torch.profiler over replays."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            graph.replay()
        torch.cuda.synchronize()
    classes: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "launches": 0})
    kernels = []
    for e in prof.key_averages():
        if e.device_time_total <= 0:
            continue
        ms, n = e.device_time_total / iters / 1e3, e.count // iters
        c = classes[kernel_class(e.key)]
        c["ms"] += ms
        c["launches"] += n
        kernels.append((e.key[:70], round(ms, 3), n))
    out = {k: {"ms": round(v["ms"], 3), "launches": v["launches"]} for k, v in sorted(classes.items())}
    return out, sorted(kernels, key=lambda k: -k[1])[:8]


def decode_batch(batch: int, ctx: int, block_size: int) -> list[ScheduledSequence]:
    params = SamplingParams(temperature=0)
    per = -(-ctx // block_size)
    return [ScheduledSequence(f"d{i}", [7], ctx - 1, list(range(i * per, (i + 1) * per)), params, True)
            for i in range(batch)]


_TRITON_FP8_QUANT = quant_ops._triton_fp8_quant
_TRITON_FP8_FUSED = fused_ops._triton_fp8_fused


def set_legacy(runner: ModelRunner, on: bool) -> None:
    """The paths this branch replaced: torch-op activation quantization after separate norm / SiLU kernels;
    no fused prologue over an fp8 cache."""
    quant_ops._triton_fp8_quant = (lambda: None) if on else _TRITON_FP8_QUANT
    fused_ops._triton_fp8_fused = (lambda: None) if on else _TRITON_FP8_FUSED
    fp8_cache = runner.kernels.kv_cache_dtype == torch.float8_e4m3fn
    for m in runner.model.modules():
        if isinstance(m, Attention):
            m.fused_prologue = runner.kernels.fused_prologue and not (on and fp8_cache)


@torch.inference_mode()
def bench_variant(model: str, variant: str, batch: int, ctx: int, legacy: bool) -> dict:
    quant, kv = VARIANTS[variant]
    t0 = time.perf_counter()
    block_size = 16
    blocks = batch * -(-ctx // block_size) + 8
    args = EngineArgs(model=model, load_format="dummy", dtype="bfloat16", quantization=quant, kv_cache_dtype=kv,
                      max_model_len=max(2048, ctx + 16), max_num_seqs=batch, enforce_eager=True,
                      max_cudagraph_tokens=0, num_gpu_blocks_override=blocks)
    config, source = create_engine_config(args)
    runner = ModelRunner(config, source)
    runner.allocate_kv_cache(blocks, capture_graphs=False)
    build_s = time.perf_counter() - t0
    input_ids, positions, meta = runner._prepare(decode_batch(batch, ctx, block_size))
    row = {"build_s": round(build_s, 1), "selection": {"fused_prologue": runner.kernels.fused_prologue,
                                                        "kv_cache_dtype": str(runner.kernels.kv_cache_dtype)}}
    modes = [False] + ([True] if legacy and variant != "bf16" else [])
    for on in modes:
        set_legacy(runner, on)
        t = time.perf_counter()  # warm-up + capture of one graph: engine start captures ~50 of them
        graph = graph_of(lambda f=runner.forward: f(input_ids, positions, meta))
        capture_s = time.perf_counter() - t
        classes, top = profile_classes(graph)
        res = {"step_ms": round(replay_ms(graph), 3), "launches": sum(c["launches"] for c in classes.values()),
               "capture_s": round(capture_s, 2), "classes": classes, "top": top}
        row["legacy" if on else "new"] = res
        del graph
    set_legacy(runner, False)
    runner.close()
    del runner
    torch.cuda.empty_cache()
    return row


@torch.inference_mode()
def act_quant_micro(batch: int, widths: list[int]) -> list[dict]:
    """The activation quantization alone: torch reference vs the Triton pass, device time per call."""
    from meshserve.kernels.quant_ref import quantize_fp8_per_token
    from meshserve.kernels.triton_fp8_quant import quantize_fp8_per_token as fast

    rows = []
    for k in widths:
        x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
        ref_us = replay_ms(graph_of(lambda x=x: quantize_fp8_per_token(x), reps=10)) * 100
        fast_us = replay_ms(graph_of(lambda x=x: fast(x), reps=10)) * 100
        rows.append({"m": batch, "k": k, "torch_us": round(ref_us, 2), "triton_us": round(fast_us, 2),
                     "speedup": round(ref_us / fast_us, 1)})
    return rows


# (name, N, K) of each projection: Llama-3.1-8B, then Qwen3-0.6B
GEMM_SHAPES = [("8b.qkv", 6144, 4096), ("8b.o", 4096, 4096), ("8b.gate_up", 28672, 4096), ("8b.down", 4096, 14336),
               ("0.6b.qkv", 4096, 1024), ("0.6b.o", 1024, 2048), ("0.6b.gate_up", 6144, 1024),
               ("0.6b.down", 1024, 3072)]


@torch.inference_mode()
def gemm_micro(batch: int) -> list[dict]:
    """Each projection at [batch, K]: bf16 F.linear vs fp8 _scaled_mm (rowwise scales, input pre-quantized)
    vs the whole fp8_linear (Triton quantization + _scaled_mm), device time per call."""
    import torch.nn.functional as F

    from meshserve.kernels.quant_ops import fp8_linear
    from meshserve.kernels.quant_ref import quantize_fp8_per_channel
    from meshserve.kernels.triton_fp8_quant import quantize_fp8_per_token

    rows = []
    for name, n, k in GEMM_SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
        wq, ws = quantize_fp8_per_channel(w)
        xq, xs = quantize_fp8_per_token(x)
        sb = ws[None, :]

        def scaled_mm(xq=xq, wq=wq, xs=xs, sb=sb):
            return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=sb, out_dtype=torch.bfloat16)

        bf16_us = replay_ms(graph_of(lambda x=x, w=w: F.linear(x, w), reps=10)) * 100
        mm_us = replay_ms(graph_of(scaled_mm, reps=10)) * 100
        lin_us = replay_ms(graph_of(lambda x=x, wq=wq, ws=ws: fp8_linear(x, wq, ws, None, None, gemv=True),
                                    reps=10)) * 100
        flop = 2 * batch * n * k
        rows.append({"shape": name, "m": batch, "n": n, "k": k, "bf16_us": round(bf16_us, 1),
                     "fp8_scaled_mm_us": round(mm_us, 1), "fp8_linear_us": round(lin_us, 1),
                     "bf16_tflops": round(flop / bf16_us / 1e6), "fp8_tflops": round(flop / mm_us / 1e6)})
        del w, wq
    torch.cuda.empty_cache()
    return rows


ATTENTION_CONFIGS = ((128, 4, None), (64, 4, 3), (128, 8, 3), (256, 4, 2), (256, 8, 2), (128, 4, 2))


@torch.inference_mode()
def attention_sweep(batch: int, ctx: int, heads: list[tuple[int, int, bool]],
                    configs: tuple = ATTENTION_CONFIGS) -> list[dict]:
    """decode_attention device time for the bf16 and fp8 caches at W2's shape (fp8vt: the fp8 cache with V
    transposed in each block, MESHSERVE_FP8_V_LAYOUT=transposed, its output checked against fp8's): the default
    tile, and for heads marked True the sweep over (BLOCK_N, warps, stages) (each config is a JIT compile:
    ~1-2 s)."""
    import os

    from meshserve.kernels import kv_layout
    from meshserve.kernels.triton_attention import decode_attention

    rows, block_size, d = [], 16, 128
    per = -(-ctx // block_size)
    tables = torch.arange(batch * per, device="cuda", dtype=torch.int32).reshape(batch, per)
    seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    qsl = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    for h, hkv, sweep in heads:
        q = torch.randn(batch, h, d, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        cache16 = torch.randn(2, batch * per, block_size, hkv, d, device="cuda", dtype=torch.bfloat16)
        c8 = cache16.to(torch.float8_e4m3fn)
        vt = kv_layout.to_transposed(c8)  # the same logical V, each block's bytes as [Hkv, D, block_size]
        outs = {}
        for name, cache in (("bf16", cache16), ("fp8", c8), ("fp8vt", vt)):
            os.environ[kv_layout.ENV] = "transposed" if name == "fp8vt" else "rows"  # read at each launch
            kv_bytes = cache.numel() * cache.element_size() * ctx / (per * block_size)
            for block_n, warps, stages in configs if sweep else configs[:1]:  # None: the default stages
                try:
                    ms = replay_ms(graph_of(lambda q=q, c=cache, o=out, bn=block_n, w=warps, s=stages: decode_attention(
                        q, c, tables, seq_lens, qsl, d**-0.5, None, o, 1, block_n=bn, num_warps=w,
                        num_stages=s), reps=5)) / 5
                    outs[name, block_n, warps, stages] = out.clone()
                except (OutOfResources, RuntimeError) as e:  # a config past shared memory: recorded, not fatal
                    rows.append({"heads": [h, hkv], "cache": name, "block_n": block_n, "warps": warps,
                                 "stages": stages, "error": str(e)[:120]})
                    continue
                ref = outs.get(("fp8", block_n, warps, stages)) if name == "fp8vt" else None
                rows.append({"heads": [h, hkv], "cache": name, "block_n": block_n, "warps": warps,
                             "stages": stages, "us": round(ms * 1e3, 1),
                             "tb_per_s": round(kv_bytes / (ms * 1e-3) / 1e12, 2),
                             **({} if ref is None else {"max_diff_vs_fp8": (out - ref).abs().max().item()})})
        del cache16, c8, vt
        os.environ.pop(kv_layout.ENV, None)
        torch.cuda.empty_cache()
    return rows


def print_model(model: str, rows: dict) -> None:
    names = sorted({c for r in rows.values() for mode in ("new", "legacy") if mode in r for c in r[mode]["classes"]})
    cols = [(v, mode) for v, r in rows.items() for mode in ("new", "legacy") if mode in r]
    print(f"\n{model}: ms per decode step (launches)")
    print(f"{'class':<18}" + "".join(f"{v + ('' if m == 'new' else '/old'):>16}" for v, m in cols))
    for c in names:
        cells = []
        for v, m in cols:
            e = rows[v][m]["classes"].get(c)
            cells.append(f"{e['ms']:>9.3f} ({e['launches']:>4})" if e else f"{'-':>16}")
        print(f"{c:<18}" + "".join(cells))
    print(f"{'step (replay)':<18}" + "".join(f"{rows[v][m]['step_ms']:>9.3f} ({rows[v][m]['launches']:>4})"
                                            for v, m in cols))
    # (the first capture of a process includes the Triton JIT compiles)
    print(f"{'capture s':<18}" + "".join(f"{rows[v][m]['capture_s']:>16.2f}" for v, m in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-3.1-8b,qwen3-0.6b")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=800)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-legacy", action="store_true", help="skip the replaced paths' A/B")
    ap.add_argument("--no-micro", action="store_true", help="skip the quantization and attention micro-benches")
    ap.add_argument("--attention-only", action="store_true", help="only the decode attention sweep")
    ap.add_argument("--attention-configs", default="",
                    help="the sweep's tiles instead of the default list: BLOCK_N,warps,stages;... (stages 0: the "
                         "kernel's default), e.g. 128,4,4;128,4,6;64,4,8 (deeper pipelines: bytes in flight)")
    ns = ap.parse_args()
    t0 = time.perf_counter()
    report: dict = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "batch": ns.batch,
                    "ctx": ns.ctx, "models": {}}
    for model in [] if ns.attention_only else ns.models.split(","):
        rows = {}
        for variant in ns.variants.split(","):
            rows[variant] = bench_variant(model, variant, ns.batch, ns.ctx, not ns.no_legacy)
            print(f"{model} {variant}: {rows[variant]['new']['step_ms']:.3f} ms/step "
                  f"(built in {rows[variant]['build_s']} s, {time.perf_counter() - t0:.0f} s so far)", flush=True)
        report["models"][model] = rows
        print_model(model, rows)
    if not ns.no_micro and not ns.attention_only:
        report["act_quant"] = act_quant_micro(ns.batch, [1024, 2048, 3072, 4096, 14336])
        print("\nactivation quantization [batch, K], us per call: torch reference vs Triton")
        for r in report["act_quant"]:
            print(f"  K={r['k']:>6}: {r['torch_us']:>8.2f} vs {r['triton_us']:>7.2f}  ({r['speedup']}x)")
        report["gemm"] = gemm_micro(ns.batch)
        print("\nprojections [batch, K] x [K, N], us per call: bf16 F.linear | fp8 _scaled_mm | fp8_linear (+quant)")
        for r in report["gemm"]:
            print(f"  {r['shape']:<13} {r['bf16_us']:>8.1f} | {r['fp8_scaled_mm_us']:>8.1f} | "
                  f"{r['fp8_linear_us']:>8.1f}   ({r['bf16_tflops']} vs {r['fp8_tflops']} TFLOPS)")
    if not ns.no_micro:
        # Qwen3-0.6B's W2 step is mostly attention: its shape gets the sweep, the 8B's the default tile
        configs = tuple(tuple(int(v) for v in c.split(",")) for c in ns.attention_configs.split(";") if c)
        configs = tuple((b, w, s or None) for b, w, s in configs) or ATTENTION_CONFIGS
        report["attention_sweep"] = attention_sweep(ns.batch, ns.ctx, [(32, 8, False), (16, 8, True)], configs)
        print("\ndecode attention (batch x ctx, 1 split): us, TB/s of KV read")
        for r in report["attention_sweep"]:
            tail = r.get("error") or f"{r['us']:>8.1f} us {r['tb_per_s']:>5.2f} TB/s"
            if "max_diff_vs_fp8" in r:
                tail += f" (max diff vs fp8 {r['max_diff_vs_fp8']:.1e})"
            print(f"  heads {r['heads']} {r['cache']:>4} BLOCK_N {r['block_n']:>3} warps {r['warps']} "
                  f"stages {r['stages']}: {tail}")
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"\ntotal {report['total_s']} s")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
