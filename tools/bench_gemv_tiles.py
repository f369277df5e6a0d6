"""The batch-1 bf16 GEMV (kernels/triton_gemv.gemv) by tile, at Llama-3.1-8B's projections, weights cold in L2.

usage: python tools/bench_gemv_tiles.py [--tiles "512,4,4;1024,4,8;..."] [--json PATH]

Each tile is MESHSERVE_GEMV_WIDE_TILE's "block_k,num_warps,block_n" (read at each launch). Each shape's GEMV
runs in one CUDA graph over enough copies of its weight to pass the 50 MB L2 (a decode step reads every
weight once: the bench_quant_gemv sweep reuses one copy, so o_proj's 33.5 MB read partly from L2 there at
"117% of copy"), PDL off; device time per call and its share of the copy bandwidth measured on the spot.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from meshserve.bench.roofline import measure_copy_bandwidth
from meshserve.kernels.triton_gemv import gemv

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DEFAULT_TILES = "512,4,4;512,4,2;512,4,8;512,4,1;1024,4,4;1024,8,8;256,4,4;256,2,2;512,8,4;512,8,8;1024,4,2"


def time_shape(n: int, k: int, act_out: bool = False) -> float:
    copies = max(2, -(-160 * 2**20 // (n * k * 2)))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    for w in ws:  # compile outside the capture
        gemv(x, w, pdl=False, act_out=act_out)
    torch.cuda.synchronize()
    reps = 4
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for w in ws:
                gemv(x, w, pdl=False, act_out=act_out)
    g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        best = min(best, s.elapsed_time(e) * 1e3 / (reps * copies))
    del ws, g
    torch.cuda.empty_cache()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", default=DEFAULT_TILES)
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    bw = measure_copy_bandwidth() / 1e9
    print(f"copy {bw:.0f} GB/s")
    rows = []
    for spec in ns.tiles.split(";"):
        os.environ["MESHSERVE_GEMV_WIDE_TILE"] = spec
        cells = []
        for name, (n, k) in SHAPES.items():
            try:
                us = time_shape(n, k, act_out=name == "gate_up")
            except Exception as e:  # noqa: BLE001 - a tile past the registers / shared memory: recorded, not fatal
                rows.append({"tile": spec, "shape": name, "error": str(e)[:100]})
                cells.append(f"{name} error")
                continue
            pct = n * k * 2 / (us * 1e-6) / 1e9 / bw * 100
            rows.append({"tile": spec, "shape": name, "us": round(us, 2), "pct_copy": round(pct, 1)})
            cells.append(f"{name} {us:6.2f} us {pct:5.1f}%")
        layer = sum(r["us"] for r in rows[-4:] if "us" in r)
        print(f"{spec:<12} " + " | ".join(cells) + f" | layer {layer:6.1f} us")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"copy_gbps": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
