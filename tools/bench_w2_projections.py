"""W2's one lever left (BENCHMARKS.md, forty-seventh session): Llama-3.1-8B's projections at 128-256 rows run at
~200-214 us a layer through cuBLAS where their floor (weights at copy bandwidth, FLOPs at ~700 TFLOP/s) is ~145 us.
This times each projection at each M four ways, from CUDA graphs: F.linear as the engine calls it (cuBLAS), the
same under torch.backends.cuda.preferred_blas_library("cublaslt") (the Lt heuristics), the rows padded up to a
multiple of 64 / 128 (whether M = 224's tile choice is the loss), gate_up with the engine's SiLU-and-mul
after it (what a fused epilogue would save), and, with --autotune, Inductor's max-autotune
(its Triton GEMM templates raced against cuBLAS on the spot: the best config found, if any beats cuBLAS).

usage (device): python tools/bench_w2_projections.py [--model M] [--m 128,192,224,256] [--autotune] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from meshserve.kernels.triton_ops import silu_and_mul
from tools.bench_fp8_step import graph_of, replay_ms

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)


def shapes_of(model: str) -> dict[str, tuple[int, int]]:
    """A dense model's four projections as (N, K), from the planner's model spec (--model)."""
    from meshserve.planner.model import load_model

    m = load_model(model)
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    return {"qkv": (q + 2 * kv, m.hidden_size), "o": (m.hidden_size, q),
            "gate_up": (2 * m.intermediate_size, m.hidden_size), "down": (m.hidden_size, m.intermediate_size)}
REPS = 20  # launches per graph: one launch is a few us of a replay's overhead


def time_us(fn) -> float:
    return replay_ms(graph_of(fn, reps=REPS), iters=10) / REPS * 1e3


def row(m: int, proj: str, kind: str, us: float, n: int, k: int) -> dict:
    r = {"m": m, "proj": proj, "kind": kind, "us": round(us, 2), "tflops": round(2 * m * n * k / us / 1e6, 1),
         "weight_tb_s": round(n * k * 2 / us / 1e6, 2)}
    print(f"m {m:>4} {proj:<8} {kind:<22} {r['us']:>8.2f} us {r['tflops']:>7.1f} TFLOP/s {r['weight_tb_s']:>5.2f} TB/s",
          flush=True)
    return r


@torch.inference_mode()
def run(ms: list[int], autotune: bool, shapes: dict[str, tuple[int, int]] = SHAPES) -> list[dict]:
    rows = []
    for proj, (n, k) in shapes.items():
        rows += bench_projection(proj, n, k, ms, autotune)
        torch.cuda.empty_cache()
    return rows


def bench_projection(proj: str, n: int, k: int, ms: list[int], autotune: bool) -> list[dict]:
    rows = []
    # weight copies cycled, >= 4 and >= 128 MB in all: o's 33.5 MB (or a small model's few MB) would otherwise
    # sit in the 50 MB L2 between launches
    copies = max(4, -(-(128 << 20) // (n * k * 2)))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    it = iter(range(10**9))

    def linear(x):
        return F.linear(x, ws[next(it) % len(ws)])

    for m in ms:
        x = torch.randn(max(256, -(-m // 128) * 128), k, device="cuda", dtype=torch.bfloat16)
        rows.append(row(m, proj, "cublas", time_us(lambda: linear(x[:m])), n, k))
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            rows.append(row(m, proj, "cublaslt", time_us(lambda: linear(x[:m])), n, k))
        finally:
            torch.backends.cuda.preferred_blas_library("cublas")
        for mp in sorted({-(-m // pad) * pad for pad in (64, 128)} - {m}):
            rows.append(row(m, proj, f"padded to {mp}", time_us(lambda mp=mp: linear(x[:mp])), n, k))
        if proj == "gate_up":  # the engine's SiLU-and-mul after it: what an epilogue fused into the GEMM saves
            rows.append(row(m, proj, "cublas + silu_and_mul", time_us(lambda: silu_and_mul(linear(x[:m]))), n, k))
        if autotune:
            rows.append(row(m, proj, "inductor max-autotune", _autotuned_us(x[:m].clone(), ws), n, k))
            if proj == "gate_up":
                rows.append(row(m, proj, "inductor + silu epilogue", _autotuned_us(x[:m].clone(), ws, gated=True),
                                n, k))
    return rows


def _autotuned_us(x: torch.Tensor, ws: list[torch.Tensor], gated: bool = False) -> float:
    import torch._inductor.config as inductor_config

    inductor_config.max_autotune_gemm_backends = "TRITON,ATEN"

    def gate_up_silu(a, w):
        gate, up = F.linear(a, w).chunk(2, dim=-1)
        return F.silu(gate) * up

    fn = torch.compile(gate_up_silu if gated else (lambda a, w: F.linear(a, w)), mode="max-autotune-no-cudagraphs",
                       dynamic=False)
    it = iter(range(10**9))
    return time_us(lambda: fn(x, ws[next(it) % len(ws)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="128,192,224,256")
    ap.add_argument("--model", default="llama-3.1-8b", help="a dense preset of the planner (its four projections)")
    ap.add_argument("--autotune", action="store_true")
    ap.add_argument("--json", default="")
    ns = ap.parse_args()
    rows = run([int(v) for v in ns.m.split(",")], ns.autotune, shapes_of(ns.model))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
