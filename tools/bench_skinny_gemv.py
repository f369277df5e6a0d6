"""A verify step's projections: cuBLAS (F.linear) vs the Triton skinny GEMV for M = 1..16 rows (issue 22).

usage: python tools/bench_skinny_gemv.py [--rows 1,2,3,5,9,16] [--sweep 5] [--json PATH]

Times each [M, K] x [N, K]^T product of Llama-3.1-8B's and Qwen3-0.6B's shapes inside a CUDA graph (no launch
overhead) and reports the weight bandwidth it reaches beside the copy bandwidth measured on the spot; at M = 1
the batch-1 GEMV (kernels/triton_gemv.py) is the row to beat. --sweep also tries other tiles (BLOCK_N,
BLOCK_K, split K, warps, stages) at those row counts and prints the best, for
kernels/triton_skinny_gemv.skinny_tiles.
Per model, "step" sums one layer's four projections x layers + the LM head: the GEMM share of a verify step.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton.testing

from meshserve.kernels.triton_gemv import gemv
from meshserve.kernels.triton_skinny_gemv import SkinnyTiles, skinny_gemv, skinny_tiles

# (N, K) per projection, and how many of it a step runs
SHAPES = {
    "8b": {"qkv": ((6144, 4096), 32), "o": ((4096, 4096), 32), "gate_up": ((28672, 4096), 32),
           "down": ((4096, 14336), 32), "lm_head": ((128256, 4096), 1)},
    "qwen3-0.6b": {"qkv": ((4096, 1024), 28), "o": ((1024, 2048), 28), "gate_up": ((6144, 1024), 28),
                   "down": ((1024, 3072), 28), "lm_head": ((151936, 1024), 1)},
}


def _sweep(n: int, k: int) -> list[SkinnyTiles]:
    tiles = [SkinnyTiles(bn, bk, s, w, st) for bn, bk, s, w, st in
             itertools.product((16, 32, 64), (128, 256, 512), (1, 2, 4), (1, 2, 4), (3, 4))
             if s == 1 or k // s >= 4 * bk]
    return tiles


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,3,5,9,16")
    ap.add_argument("--sweep", default="", help="row counts to sweep tiles at (e.g. 5)")
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    sweep_rows = {int(r) for r in ns.sweep.split(",") if r}
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / (triton.testing.do_bench(lambda: dst.copy_(src)) * 1e-3)
    del src, dst
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s")
    rows_out = []
    for model, shapes in SHAPES.items():
        step = {}
        for name, ((n, k), count) in shapes.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            nbytes = w.numel() * 2
            for m in [int(r) for r in ns.rows.split(",")]:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = F.linear(x, w)
                t_cublas = triton.testing.do_bench_cudagraph(lambda: F.linear(x, w)) * 1e3  # noqa: B023 (us)
                if m == 1:
                    fast, cfg = gemv(x, w), "gemv"
                    t_fast = triton.testing.do_bench_cudagraph(lambda: gemv(x, w)) * 1e3  # noqa: B023
                else:
                    fast = skinny_gemv(x, w)
                    t_fast = triton.testing.do_bench_cudagraph(lambda: skinny_gemv(x, w)) * 1e3  # noqa: B023
                    cfg = skinny_tiles(n, k, torch.cuda.get_device_properties(0).multi_processor_count)
                ok = torch.allclose(fast.float(), ref.float(), atol=2e-2, rtol=2e-2)
                best = None
                if m in sweep_rows and m > 1:
                    for t in _sweep(n, k):
                        try:
                            y = skinny_gemv(x, w, tiles=t)
                            if not torch.allclose(y.float(), ref.float(), atol=2e-2, rtol=2e-2):
                                continue
                            us = triton.testing.do_bench_cudagraph(
                                lambda: skinny_gemv(x, w, tiles=t)) * 1e3  # noqa: B023
                        except Exception as e:  # noqa: BLE001 - a tile that does not compile or fit is skipped
                            print(f"  {model} {name} m={m} {t}: {type(e).__name__}")
                            continue
                        if best is None or us < best[0]:
                            best = (us, t)
                row = {"model": model, "proj": name, "n": n, "k": k, "m": m, "cublas_us": round(t_cublas, 2),
                       "triton_us": round(t_fast, 2), "ok": ok, "tiles": str(cfg),
                       "best_us": round(best[0], 2) if best else None, "best_tiles": str(best[1]) if best else None}
                rows_out.append(row)
                s = step.setdefault(m, [0.0, 0.0])
                s[0] += count * t_cublas
                s[1] += count * t_fast
                print(f"{model:11s} {name:8s} m={m:2d} {nbytes / 2**20:7.1f} MiB  cuBLAS {t_cublas:7.1f} us "
                      f"({nbytes / (t_cublas * 1e-6) / bw:4.0%})  triton {t_fast:7.1f} us "
                      f"({nbytes / (t_fast * 1e-6) / bw:4.0%}){'' if ok else ' MISMATCH'}"
                      + (f"  best {best[0]:7.1f} us {best[1]}" if best else ""))
            del w
        for m, (c, t) in sorted(step.items()):
            print(f"{model:11s} step    m={m:2d}  cuBLAS {c / 1e3:6.2f} ms  triton {t / 1e3:6.2f} ms  ({c / t:4.2f}x)")
            rows_out.append({"model": model, "proj": "step", "m": m, "cublas_ms": round(c / 1e3, 3),
                             "triton_ms": round(t / 1e3, 3)})
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"copy_bw": bw, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
