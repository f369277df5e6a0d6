"""Every decode tile (block_n x warps x stages) at W2's three decode shapes, bf16 and fp8 caches, beside the tile
the engine picks: the data behind kernels/triton_attention.decode_tile (its first run: H200, 2026-12-03,
benchmarks/results/h200_1203_s25/call5_fp8_tile_probe/).

usage: python tools/probe_decode_tiles.py OUT.json

Shapes (8 KV heads, head_dim 128, block 16, the split count decode_num_splits picks): batch 256 context 1,024
GQA group 2 (Qwen3-0.6B's W2 at full batch), batch 64 context 2,048 group 4, batch 16 context 2,048 group 4.
One line per shape: the picked tile's time and TB/s (cache bytes / time), then the four fastest tiles.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshserve.kernels.triton_attention import _num_sms, decode_attention, decode_num_splits, decode_tile
from tools.sweep_decode_attention import make_case

SHAPES = ((256, 1024, 2), (64, 2048, 4), (16, 2048, 4))
TILES = list(itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4)))


def probe(kv_dtype, batch: int, ctx: int, group: int) -> dict:
    q, cache, tables, seq_lens, qsl, out, kv_bytes = make_case(batch, ctx, 8, group, kv_dtype=kv_dtype)
    sms = _num_sms(0)
    splits = decode_num_splits(batch, 8, ctx, 64, sms)
    picked = decode_tile(batch, 8, 128, sms)
    rows = []
    for block_n, warps, stages in [picked, *TILES]:
        fn = functools.partial(decode_attention, q, cache, tables, seq_lens, qsl, 128**-0.5, None, out, splits,
                               block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            fn()
            us = triton.testing.do_bench(fn, warmup=5, rep=20) * 1e3
        except Exception as e:  # noqa: BLE001 - out of shared memory etc.: skip the tile
            print(f"  skip {block_n}/{warps}/{stages}: {type(e).__name__}")
            continue
        rows.append({"block_n": block_n, "warps": warps, "stages": stages, "us": us, "tb_s": kv_bytes / us / 1e6})
    best = sorted(rows[1:], key=lambda r: r["us"])
    name = "fp8" if kv_dtype is not None else "bf16"
    print(f"{name} b{batch} ctx{ctx} g{group} splits {splits}: picked {picked} {rows[0]['us']:.1f} us "
          f"({rows[0]['tb_s']:.2f} TB/s); best " + "; ".join(
              f"{r['block_n']}/{r['warps']}/{r['stages']} {r['us']:.1f} ({r['tb_s']:.2f})" for r in best[:4]),
          flush=True)
    return {"cache": name, "batch": batch, "ctx": ctx, "group": group, "splits": splits, "picked": rows[0],
            "tiles": best}


def main() -> None:
    results = [probe(kv, *shape) for kv in (torch.float8_e4m3fn, None) for shape in SHAPES]
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
