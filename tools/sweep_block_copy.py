"""The KV block-copy kernel's tiles on one GPU (kernels/triton_block_copy.py, the ipc connector's read): device time
of one read of N scattered blocks over every layer, per tile, beside torch's copy of the same bytes in one piece.

usage: python tools/sweep_block_copy.py OUT.json [--blocks 16,256,512] [--pool-blocks 2048]

Pools as the kv_link bench makes them (Llama-3.1-8B: 32 layers of [2, pool, 16, 8, 128] bf16, 32 KiB a K or V
block), ids drawn without replacement from the producer's and the consumer's pools. Each launch is captured in a
CUDA graph and replayed back to back (cuda_graph.captured_us: no host time in the figure; a small read's blocks
may stay in L2 across replays, a pull's would not). One line per block count: the default tile, then the five
fastest; the best tile by the largest read is the one to compare end to end with MESHSERVE_BLOCK_COPY_TILE.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshserve.engine.cuda_graph import captured_us
from meshserve.kernels.triton_block_copy import CopyTile, PoolPointers, copy_blocks

TILES = [CopyTile(c, p, w) for c, p, w in itertools.product((4096, 8192, 16384, 32768), (1, 2, 4), (4, 8, 16))
         if c * p <= 65536]


def sweep(blocks: int, pool_blocks: int, layers: int = 32) -> dict:
    g = torch.Generator().manual_seed(blocks)
    shape = (2, pool_blocks, 16, 8, 128)
    src = [torch.empty(shape, device="cuda", dtype=torch.bfloat16).normal_() for _ in range(layers)]
    dst = [torch.zeros(shape, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    src_ids = torch.randperm(pool_blocks, generator=g)[:blocks].cuda()
    dst_ids = torch.randperm(pool_blocks, generator=g)[:blocks].cuda()
    pointers = PoolPointers.of(dst, src)
    nbytes = src[0][:, 0].nbytes * blocks * layers
    whole_src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    whole_dst = torch.empty_like(whole_src)
    copy_us = captured_us(lambda: whole_dst.copy_(whole_src))
    rows = []
    for tile in [CopyTile(), *TILES]:
        us = captured_us(lambda tile=tile: copy_blocks(pointers, dst_ids, src_ids, None, tile))
        rows.append({"tile": [tile.chunk_bytes, tile.pairs, tile.num_warps], "us": round(us, 2),
                     "GBps": round(nbytes / us / 1e3, 1)})
    expected = [s[:, src_ids.cpu()] for s in (src[0].cpu(), src[-1].cpu())]  # (the last tile's copy, checked)
    assert torch.equal(dst[0][:, dst_ids].cpu(), expected[0]) and torch.equal(dst[-1][:, dst_ids].cpu(), expected[1])
    del src, dst
    torch.cuda.empty_cache()
    return {"blocks": blocks, "bytes": nbytes, "copy_us": round(copy_us, 2),
            "copy_GBps": round(nbytes / copy_us / 1e3, 1), "default": rows[0],
            "fastest": sorted(rows[1:], key=lambda r: r["us"])[:5], "all": rows[1:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output")
    p.add_argument("--blocks", default="16,256,512")
    p.add_argument("--pool-blocks", type=int, default=2048)
    ns = p.parse_args()
    results = []
    for n in (int(v) for v in ns.blocks.split(",")):
        r = sweep(n, ns.pool_blocks)
        results.append(r)
        d = r["default"]
        best = " ".join(f"{t['tile']}:{t['us']}us/{t['GBps']}" for t in r["fastest"])
        print(f"{n} blocks ({r['bytes'] / 2**20:.0f} MiB): copy {r['copy_us']} us ({r['copy_GBps']} GB/s); "
              f"default {d['tile']} {d['us']} us ({d['GBps']} GB/s); fastest {best}", flush=True)
    with open(ns.output, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
