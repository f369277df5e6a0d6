"""The fastest fp8vt decode tile of a bench_fp8_step.py --attention-only sweep at one head shape, printed as
BLOCK_N,num_warps,num_stages (for MESHSERVE_DECODE_GRID_TILE); the grid tile in use (64,2,2) when none beats it.
Usage: python3 tools/pick_fp8vt_tile.py SWEEP.json [HQ,HKV]"""

import json
import sys

rows = json.load(open(sys.argv[1]))["attention_sweep"]
heads = [int(h) for h in (sys.argv[2] if len(sys.argv) > 2 else "16,8").split(",")]
vt = [r for r in rows if r["cache"] == "fp8vt" and r["heads"] == heads and r["stages"]]
best = min(vt, key=lambda r: r["us"])
print(f"{best['block_n']},{best['warps']},{best['stages']}")
