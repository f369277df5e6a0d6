"""Decode attention at W2's batch: the split kernel (one split, the engine's tile for the cache) against the
balanced kernel (kernels/triton_decode_balanced.py) at several programs an SM, over uniform contexts and W2-like
ones (a prompt of 100-1,024 tokens plus part of a 100-1,024-token answer, DESIGN.md's W2 draws), for the bf16
cache and the fp8 cache with V transposed, at Llama-3.1-8B's and Qwen3-0.6B's heads. Each launch is replayed from
a CUDA graph; the balanced outputs are checked against the split kernel's.

usage (on the device): python tools/bench_decode_balanced.py [--batch 256] [--per-sm 4,5,6]
       [--tiles "64,2,2;128,4,3"] [--json PATH]   (tiles: the balanced kernel's; default the engine's, GRID_TILE)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from meshserve.kernels import kv_layout
from meshserve.kernels.triton_attention import GRID_TILE, _num_sms, decode_attention, decode_tile
from meshserve.kernels.triton_decode_balanced import decode_attention_balanced
from tools.bench_fp8_step import graph_of, replay_ms


def w2_lengths(batch: int, seed: int = 0) -> list[int]:
    """Contexts of a W2 decode step: each sequence's prompt plus a uniform share of its answer so far."""
    rng = random.Random(seed)
    return [rng.randint(100, 1024) + rng.randint(0, rng.randint(100, 1024)) for _ in range(batch)]


@torch.inference_mode()
def run(batch: int, per_sm: list[int], tiles: list[tuple[int, int, int]] | None = None, reps: int = 5) -> list[dict]:
    rows, block_size, d = [], 16, 128
    sms = _num_sms(0)
    for lengths_name, lengths in (("uniform 800", [800] * batch), ("w2", w2_lengths(batch))):
        per = -(-max(lengths) // block_size)
        tables = torch.arange(batch * per, device="cuda", dtype=torch.int32).reshape(batch, per)
        seq_lens = torch.tensor(lengths, device="cuda", dtype=torch.int32)
        qsl = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
        for h, hkv in ((32, 8), (16, 8)):
            q = torch.randn(batch, h, d, device="cuda", dtype=torch.bfloat16)
            cache16 = torch.randn(2, batch * per, block_size, hkv, d, device="cuda", dtype=torch.bfloat16)
            for cache_name in ("bf16", "fp8vt"):
                os.environ[kv_layout.ENV] = "transposed"
                cache = cache16 if cache_name == "bf16" else kv_layout.to_transposed(cache16.to(torch.float8_e4m3fn))
                kv_bytes = sum(lengths) * hkv * d * 2 * cache.element_size()
                # the engine's split-kernel tile for this cache: the grid tile over fp8, the default over bf16
                tile = decode_tile(batch, hkv, d, sms) if cache_name == "fp8vt" else (None, 4, None)
                split_out = torch.empty_like(q)
                ms = replay_ms(graph_of(lambda: decode_attention(
                    q, cache, tables, seq_lens, qsl, d**-0.5, None, split_out, 1, block_n=tile[0],
                    num_warps=tile[1], num_stages=tile[2], fp8_path="words"), reps=reps)) / reps
                base = {"lengths": lengths_name, "heads": [h, hkv], "cache": cache_name}
                rows.append({**base, "kernel": f"split {tile}", "us": round(ms * 1e3, 1),
                             "tb_per_s": round(kv_bytes / (ms * 1e-3) / 1e12, 2)})
                for btile in tiles or [GRID_TILE]:
                    for n in per_sm:
                        out = torch.empty_like(q)
                        ms = replay_ms(graph_of(lambda n=n, out=out, t=btile: decode_attention_balanced(
                            q, cache, tables, seq_lens, qsl, d**-0.5, out, t, n), reps=reps)) / reps
                        rows.append({**base, "kernel": f"balanced {n}/SM {btile}", "us": round(ms * 1e3, 1),
                                     "tb_per_s": round(kv_bytes / (ms * 1e-3) / 1e12, 2),
                                     "max_diff_vs_split": (out.float() - split_out.float()).abs().max().item()})
                print("\n".join(f"{r['lengths']:<12} {str(r['heads']):<9} {r['cache']:<6} {r['kernel']:<34} "
                                f"{r['us']:>8.1f} us {r['tb_per_s']:>5.2f} TB/s"
                                + (f"  max diff {r['max_diff_vs_split']:.2e}" if "max_diff_vs_split" in r else "")
                                for r in rows if r["lengths"] == lengths_name and r["heads"] == [h, hkv]
                                and r["cache"] == cache_name), flush=True)
            del cache16
            torch.cuda.empty_cache()
    os.environ.pop(kv_layout.ENV, None)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--per-sm", default="4,5,6")
    ap.add_argument("--tiles", default="", help="the balanced kernel's BLOCK_N,warps,stages;... (default: per cache)")
    ap.add_argument("--json", default="")
    ns = ap.parse_args()
    tiles = [tuple(int(v) for v in t.split(",")) for t in ns.tiles.split(";") if t] or None
    rows = run(ns.batch, [int(v) for v in ns.per_sm.split(",")], tiles)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
