"""Decode attention at W2's batch: the split kernel (one split, the engine's tile for the cache) against the
balanced kernel (kernels/triton_decode_balanced.py) at several programs an SM, over uniform contexts and W2-like
ones (a prompt of 100-1,024 tokens plus part of a 100-1,024-token answer, DESIGN.md's W2 draws), for the bf16
cache and the fp8 cache with V transposed, at Llama-3.1-8B's and Qwen3-0.6B's heads. Each launch is replayed from
a CUDA graph; the balanced outputs are checked against the split kernel's.

usage (on the device): python tools/bench_decode_balanced.py [--batch 256] [--per-sm 4,5,6]
       [--tiles "64,2,2;128,4,3"] [--caps rule,none,200] [--json PATH]
  tiles: the balanced kernel's (default the engine's, GRID_TILE); caps: the per-thread register cap of each launch,
  "rule" (max_registers: what N programs an SM need), "none" or a number (the thirty-ninth session's 5-an-SM
  launches ran ~1.5x slower than 4 or 6 under the rule of then, 200, which leaves 4 resident: registers come
  from an SM's four sub-partitions, 16,384 each; the rule now says 168)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from meshserve.kernels import kv_layout, triton_decode_balanced
from meshserve.kernels.triton_attention import GRID_TILE, _num_sms, decode_attention, decode_tile
from meshserve.kernels.triton_decode_balanced import decode_attention_balanced
from tools.bench_fp8_step import graph_of, replay_ms


def w2_lengths(batch: int, seed: int = 0) -> list[int]:
    """Contexts of a W2 decode step: each sequence's prompt plus a uniform share of its answer so far."""
    rng = random.Random(seed)
    return [rng.randint(100, 1024) + rng.randint(0, rng.randint(100, 1024)) for _ in range(batch)]


@torch.inference_mode()
def run(batch: int, per_sm: list[int], tiles: list[tuple[int, int, int]] | None = None, reps: int = 5,
        caps: tuple[str, ...] = ("rule",)) -> list[dict]:
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
                for btile, n, cap in [(t, n, c) for t in tiles or [GRID_TILE] for n in per_sm for c in caps]:
                    out = torch.empty_like(q)
                    with _register_cap(cap):
                        ms = replay_ms(graph_of(lambda n=n, out=out, t=btile: decode_attention_balanced(
                            q, cache, tables, seq_lens, qsl, d**-0.5, out, t, n), reps=reps)) / reps
                    label = f"balanced {n}/SM {btile}" + ("" if cap == "rule" else f" regs {cap}")
                    rows.append({**base, "kernel": label, "us": round(ms * 1e3, 1),
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


@contextlib.contextmanager
def _register_cap(cap: str):
    """The launches inside take this register cap ("rule": max_registers' own; "none": uncapped; else a number)."""
    rule = triton_decode_balanced.max_registers
    if cap != "rule":
        triton_decode_balanced.max_registers = lambda per_sm, warps: None if cap == "none" else int(cap)
    try:
        yield
    finally:
        triton_decode_balanced.max_registers = rule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--per-sm", default="4,5,6")
    ap.add_argument("--tiles", default="", help="the balanced kernel's BLOCK_N,warps,stages;... (default: per cache)")
    ap.add_argument("--caps", default="rule", help="register caps: rule, none or a number, comma-separated")
    ap.add_argument("--json", default="")
    ns = ap.parse_args()
    tiles = [tuple(int(v) for v in t.split(",")) for t in ns.tiles.split(";") if t] or None
    rows = run(ns.batch, [int(v) for v in ns.per_sm.split(",")], tiles, caps=tuple(ns.caps.split(",")))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
