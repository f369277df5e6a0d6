"""Projections at decode batches: cuBLAS against the Triton decode GEMMs (kernels/triton_decode_gemm.py) with
their rule's tile and, with --sweep, a list of tiles. fp8 (rowwise scales): torch._scaled_mm against
fp8_rowwise_gemm at Llama-3.1-8B's projections (qkv, o, gate_up, down); bf16: F.linear against gemm_16bit at
Qwen3-0.6B's (and its LM head); bf16-8b: the same at Llama-3.1-8B's. M = 64, 128, 256, 512 by default (W2's
decode batches). CUDA-graph timing (triton.testing.do_bench_cudagraph); each Triton result is checked against
cuBLAS's.

usage (on the device): python tools/bench_decode_gemm.py [--m 64,128,256,512] [--formats fp8,bf16,bf16-8b]
       [--sweep] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

from meshserve.kernels.triton_decode_gemm import _num_sms, decode_tile, fp8_rowwise_gemm, gemm_16bit
from meshserve.kernels.triton_ops import silu_and_mul

SHAPES = {  # (N, K)
    "fp8": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},  # 8B
    "bf16": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "gate_up+silu": (6144, 1024),
             "down": (1024, 3072), "lm_head": (151936, 1024)},  # Qwen3-0.6B (+silu: the gated epilogue against
    # F.linear then the SiLU-and-mul kernel)
    # Llama-3.1-8B in bf16: how far cuBLAS runs from the FLOP roof at W2's compute-bound batches (129-256 rows)
    "bf16-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                "lm_head": (128256, 4096)},
}
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); SPLIT_K from the rule, then 1 and 2x it
SWEEP = ((64, 64, 128, 4, 5), (64, 128, 128, 4, 4), (64, 256, 128, 8, 3), (128, 64, 128, 4, 4),
         (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (128, 256, 128, 8, 3), (128, 128, 64, 8, 6))


def bench_shape(fmt: str, m: int, name: str, n: int, k: int, sms: int, sweep: bool) -> list[dict]:
    """One projection at M rows: cuBLAS, then the Triton GEMM at its rule's tile (and SWEEP's, if asked)."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(m)
    if fmt == "fp8":
        xq = torch.randn(m, k, device="cuda", generator=g).mul(40).clamp(-448, 448).to(torch.float8_e4m3fn)
        wq = torch.randn(n, k, device="cuda", generator=g).mul(40).clamp(-448, 448).to(torch.float8_e4m3fn)
        xs = torch.rand(m, 1, device="cuda", generator=g) * 0.01
        ws = torch.rand(n, device="cuda", generator=g) * 0.01
    else:
        xq = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
        wq = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    elem = wq.element_size()
    flop, weight_bytes = 2 * m * n * k, n * k * elem

    def record(kind, us, tile=None, diff=None):
        r = {"m": m, "proj": name, "kind": kind, "tile": tile, "us": round(us, 2),
             "tflops": round(flop / us / 1e6, 1), "weight_tb_s": round(weight_bytes / us / 1e6, 2),
             **({} if diff is None else {"max_rel_diff": diff})}
        rows.append(r)
        print(f"{fmt:<4} m {m:>4} {name:<8} {kind:<13} {str(tile):<32} {r['us']:>8.2f} us {r['tflops']:>7.1f} TFLOP/s "
              f"{r['weight_tb_s']:>5.2f} TB/s" + ("" if diff is None else f"  rel {diff:.1e}"), flush=True)

    gated = name.endswith("+silu")

    def cublas():
        if fmt == "fp8":
            return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws[None, :], out_dtype=torch.bfloat16)
        y = torch.nn.functional.linear(xq, wq)
        return silu_and_mul(y) if gated else y

    want = cublas()
    record("scaled_mm" if fmt == "fp8" else "F.linear", triton.testing.do_bench_cudagraph(cublas) * 1e3)
    default = decode_tile(m, n // 2 if gated else n, k, sms, elem, gated)
    tiles = [default]
    if sweep:
        for bm, bn, bk, warps, stages in SWEEP:
            bk = bk // elem
            split = default[3] if (bm, bn) == default[:2] else 1
            for s in sorted({1, split, 2 * split}):
                if (bm, bn, bk, s, warps, stages) not in tiles:
                    tiles.append((bm, bn, bk, s, warps, stages))
    for tile in tiles:
        def triton_gemm(t=tile):
            if fmt == "fp8":
                return fp8_rowwise_gemm(xq, xs, wq, ws, None, torch.bfloat16, tile=t)
            return gemm_16bit(xq, wq, tile=t, act_gated=gated)

        try:
            got = triton_gemm()
            us = triton.testing.do_bench_cudagraph(triton_gemm) * 1e3
        except (OutOfResources, RuntimeError) as e:  # a tile past shared memory: recorded, not fatal
            rows.append({"m": m, "proj": name, "tile": tile, "error": str(e)[:100]})
            continue
        diff = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        record("triton (rule)" if tile == default else "triton", us, tile, diff)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="64,128,256,512")
    ap.add_argument("--formats", default="fp8,bf16")
    ap.add_argument("--sweep", action="store_true", help="also every tile of SWEEP (BLOCK_K in bytes: halved for bf16)")
    ap.add_argument("--json", default="")
    ns = ap.parse_args()
    sms = _num_sms(0)
    rows = []
    for fmt in ns.formats.split(","):
        for m in (int(v) for v in ns.m.split(",")):
            for name, (n, k) in SHAPES[fmt].items():
                rows += bench_shape(fmt, m, name, n, k, sms, ns.sweep)
                torch.cuda.empty_cache()
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
