"""fp8 projections at decode batches: torch._scaled_mm (rowwise scales) against the Triton rowwise GEMM
(kernels/triton_fp8_rowwise.py) with its default tile and a sweep of tiles, at Llama-3.1-8B's projections (qkv,
o, gate_up, down) and M = 64, 128, 256, 512 (W2's decode batches and mixed steps). CUDA-graph timing
(triton.testing.do_bench_cudagraph); each Triton result is checked against _scaled_mm's.

usage (on the device): python tools/bench_fp8_rowwise.py [--m 64,128,256,512] [--sweep] [--json PATH]
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

from meshserve.kernels.triton_fp8_rowwise import _num_sms, fp8_rowwise_gemm, rowwise_tile

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); SPLIT_K from the rule, then 1 and 2x it
SWEEP = ((64, 64, 128, 4, 5), (64, 128, 128, 4, 4), (64, 256, 128, 8, 3), (128, 64, 128, 4, 4),
         (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (128, 256, 128, 8, 3), (128, 128, 64, 8, 6))


def bench_shape(m: int, name: str, n: int, k: int, sms: int, sweep: bool) -> list[dict]:
    """One projection at M rows: _scaled_mm, then the Triton GEMM at its rule's tile (and SWEEP's, if asked)."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(m)
    xq = torch.randn(m, k, device="cuda", generator=g).mul(40).clamp(-448, 448).to(torch.float8_e4m3fn)
    wq = torch.randn(n, k, device="cuda", generator=g).mul(40).clamp(-448, 448).to(torch.float8_e4m3fn)
    xs = torch.rand(m, 1, device="cuda", generator=g) * 0.01
    ws = torch.rand(n, device="cuda", generator=g) * 0.01
    flop, weight_bytes = 2 * m * n * k, n * k

    def record(kind, us, tile=None, diff=None):
        r = {"m": m, "proj": name, "kind": kind, "tile": tile, "us": round(us, 2),
             "tflops": round(flop / us / 1e6, 1), "weight_tb_s": round(weight_bytes / us / 1e6, 2),
             **({} if diff is None else {"max_rel_diff": diff})}
        rows.append(r)
        print(f"m {m:>4} {name:<8} {kind:<13} {str(tile):<32} {r['us']:>8.2f} us {r['tflops']:>7.1f} TFLOP/s "
              f"{r['weight_tb_s']:>5.2f} TB/s" + ("" if diff is None else f"  rel {diff:.1e}"), flush=True)

    def scaled_mm():
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws[None, :], out_dtype=torch.bfloat16)

    want = scaled_mm()
    record("scaled_mm", triton.testing.do_bench_cudagraph(scaled_mm) * 1e3)
    default = rowwise_tile(m, n, k, sms)
    tiles = [default]
    if sweep:
        for bm, bn, bk, warps, stages in SWEEP:
            split = default[3] if (bm, bn) == default[:2] else 1
            for s in sorted({1, split, 2 * split}):
                if (bm, bn, bk, s, warps, stages) not in tiles:
                    tiles.append((bm, bn, bk, s, warps, stages))
    for tile in tiles:
        def triton_gemm(t=tile):
            return fp8_rowwise_gemm(xq, xs, wq, ws, None, torch.bfloat16, tile=t)

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
    ap.add_argument("--sweep", action="store_true", help="also every tile of SWEEP")
    ap.add_argument("--json", default="")
    ns = ap.parse_args()
    sms = _num_sms(0)
    rows = []
    for m in (int(v) for v in ns.m.split(",")):
        for name, (n, k) in SHAPES.items():
            rows += bench_shape(m, name, n, k, sms, ns.sweep)
            torch.cuda.empty_cache()
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
