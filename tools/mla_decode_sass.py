"""Static sm_90 facts of the MLA decode tile loops at V2-Lite's shapes, without a GPU (issue 24): the balanced
kernel compiled with Triton's bundled ptxas for each loop and tile, then its shared memory, registers and stack
(cuobjdump -res-usage), the latent tile's shared buffers (TTGIR memdesc), and the instruction mix of the tile
loop (nvdisasm: the smallest backward-branch loop holding the MMAs), per warp and tile.

usage: python tools/mla_decode_sass.py [--dump DIR]

Reading it: a tile of BLOCK_N rows is BLOCK_N x 576 x 2 B of latents (36 KB at 32 rows); "buf" 1 means the copy
of tile t + 1 cannot start before tile t's dots have read the buffer (no overlap within a program); "res/SM"
the programs resident on an SM (shared memory and registers), so "ahead/SM" = res/SM x (buf - 1) x tile bytes
is what an SM keeps loading while its programs compute (the H200 needs ~16 B/clk x the loaded latency, ~30-50
KB an SM; the plain loop has 0: only the SM's other program's load overlaps a program's math; the prefetch
loop's next tile sits in registers, which the column does not count: its LDL/STL are those registers spilled).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from meshserve.kernels.triton_mla_balanced import _mla_balanced_kernel
from tools.sass_loops import backward_loops, cubin_facts, opcodes

SIG = {n: "*bf16" for n in ("ql_ptr", "qp_ptr", "cache_ptr", "out_ptr")}
SIG.update(bt_ptr="*i64", seq_lens_ptr="*i64", qsl_ptr="*i64", ws_acc_ptr="*fp32", ws_ml_ptr="*fp32",
           pieces_ptr="*i32", scale_log2="fp32")
CONST = dict(NUM_HEADS=16, BLOCK_H=16, RANK=512, BLOCK_R=512, ROPE=64, BLOCK_P=64, BLOCK_SIZE=16, BLOCK_N=32,
             BLOCK_B=256, OVERHEAD_UNITS=2, UPCAST_DOT=False, DOT_PRECISION="tf32", PREFETCH=False,
             TRANSPOSED=False, PIPELINED=False)
# (name, loop flag, BLOCK_N, num_warps, num_stages): the default balanced kernel, the two earlier variants,
# the pipelined loop's candidates (tools/bench_mla_decode.py's "pl" tiles)
VARIANTS = [("balanced (default)", None, 32, 4, 2), ("prefetch", "PREFETCH", 32, 4, 1),
            ("transposed", "TRANSPOSED", 64, 4, 2)] + [
    ("pipelined", "PIPELINED", n, w, s) for n, w, s in ((32, 4, 3), (16, 4, 4), (16, 4, 5), (32, 8, 3), (32, 4, 4),
                                                        (64, 8, 3))]
KINDS = ("LDG", "LDGSTS", "LDSM", "LDS", "STS", "HMMA", "HGMMA", "BAR", "LDL", "STL")


def compile_sm90(const: dict, warps: int, stages: int):
    names = list(_mla_balanced_kernel.arg_names)
    sig = {**{n: "i32" for n in names}, **SIG, **{n: "constexpr" for n in const}}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or "stride" in n}
    src = ASTSource(_mla_balanced_kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def tile_loop(sass: str) -> collections.Counter:
    """Opcode counts of the smallest loop that holds MMAs (the tile loop)."""
    with_mma = [body for body in backward_loops(sass) if any("MMA" in x for x in body)]
    return opcodes(min(with_mma, key=len, default=[]))


def facts(compiled) -> dict:
    regs, stack, sass = cubin_facts(compiled)
    ops = tile_loop(sass)
    kinds = {k: sum(v for o, v in ops.items() if o.split(".")[0] == k) for k in KINDS}
    bufs = sorted({int(n) for n in re.findall(r"memdesc<(\d+)x\d+x512xbf16", compiled.asm["ttgir"])})
    return dict(regs=regs, stack=stack, shared=compiled.metadata.shared, bufs=bufs, loop=sum(ops.values()),
                kinds=kinds, sass=sass)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", help="write each variant's SASS and TTGIR into this folder")
    args = ap.parse_args()
    print("sm_90, V2-Lite (16 heads, 512 + 64, bf16, blocks of 16), the balanced kernel; loop counts per warp and tile")
    print(f"{'variant':28s} {'smem':>7s} {'regs':>4s} {'stack':>5s} {'buf':>4s} {'res/SM':>6s} {'ahead/SM':>9s}"
          f" {'loop':>5s} {'/KB':>5s}  " + " ".join(f"{k:>6s}" for k in KINDS))
    for name, flag, block_n, warps, stages in VARIANTS:
        const = {**CONST, "BLOCK_N": block_n, **({flag: True} if flag else {})}
        k = compile_sm90(const, warps, stages)
        f = facts(k)
        tile_kb = block_n * 576 * 2 / 1024
        resident = max(1, min(227 * 1024 // max(1, f["shared"]), 65536 // (max(f["regs"], 1) * 32 * warps)))
        buf = max(f["bufs"] or [1])
        label = f"{name} {block_n},{warps},{stages}"
        print(f"{label:28s} {f['shared']:7d} {f['regs']:4d} {f['stack']:5d} {buf:4d} {resident:6d}"
              f" {resident * (buf - 1) * tile_kb:7.0f}KB {f['loop']:5d} {f['loop'] / tile_kb:5.1f}  "
              + " ".join(f"{f['kinds'][k]:6d}" for k in KINDS), flush=True)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            stem = os.path.join(args.dump, re.sub(r"[^\w.-]+", "_", label).strip("_"))
            with open(stem + ".sass", "w") as out:
                out.write(f["sass"])
            with open(stem + ".ttgir", "w") as out:
                out.write(k.asm["ttgir"])


if __name__ == "__main__":
    main()
