"""Static sm_90 numbers of the plain decode split kernel (_decode_split_kernel; --kernel balanced: the balanced
kernel, kernels/triton_decode_balanced.py) over a bf16 and an fp8 (e4m3) cache, without a GPU: compiled with Triton's bundled ptxas (as tools/int4_gemv_sass.py), then registers / stack
(cuobjdump -res-usage), shared memory, and the KV loop's SASS (nvdisasm: the largest backward-branch loop, one
KV tile per iteration) by instruction class, per thread and per warp-instruction per KiB of cache read, so the
fp8 path's conversion cost shows beside bf16's.

usage: python tools/decode_attention_sass.py [--dump DIR] [--ops] [--fp8-tile convert words ...]
       [--launch N,W,S ...] [--model qwen llama] [--no-bf16] [--kernel split|balanced]

Configs: Qwen3-0.6B (16 / 8 heads, group 2) and Llama-3.1-8B (32 / 8, group 4), head_dim 128, block 16, one
split (direct output), ROWS 16, at block_n 128 / 4 warps / 3 stages (the default: _decode_block_n keys on the
query's 2-byte elements, so an fp8 cache gets 128 too) and 64 / 2 / 2 (the best fp8 tile measured on an H200).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["TRITON_INTERPRET"] = "0"

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from meshserve.kernels.triton_attention import _decode_split_kernel
from meshserve.kernels.triton_decode_balanced import _decode_balanced_kernel
from meshserve.kernels.triton_e4m3_words import FP8_TILES
from tools.sass_loops import backward_loops, cubin_facts, opcodes

SIG = {
    "q_ptr": "*bf16",
    "cache_ptr": "*bf16",
    "bt_ptr": "*i32",
    "seq_lens_ptr": "*i32",
    "qsl_ptr": "*i32",
    "out_ptr": "*bf16",
    "ws_acc_ptr": "*fp32",
    "ws_ml_ptr": "*fp32",
    "ticket_ptr": "*i32",
    "scale_log2": "fp32",
    "k_scale": "fp32",
    "v_scale": "fp32",
}
TILE = {
    "HEAD_DIM": 128,
    "BLOCK_D": 128,
    "BLOCK_SIZE": 16,
    "UPCAST_DOT": False,
    "DOT_PRECISION": "tf32",
    "USE_WINDOW": False,
    "DIRECT_OUT": True,
    "LAST_REDUCES": False,
    "stride_cd": 1,
    "stride_od": 1,
    "stride_qd": 1,
    "BLOCK_B": 256,  # the balanced kernel's batch vector (W2: 256 sequences)
    "OVERHEAD_UNITS": 1,
}  # unit strides: specialised to 1 at a real launch; each kernel takes the names it has
MODELS = {
    "qwen": {"NUM_HEADS": 16, "GROUP": 2, "ROWS": 16},
    "llama": {"NUM_HEADS": 32, "GROUP": 4, "ROWS": 16},
}
LAUNCHES = ((128, 4, 3), (64, 2, 2))  # (block_n, warps, stages)
# instruction classes of the loop body (the first matching prefix wins)
CLASSES = (
    ("HMMA", ("HMMA",)),
    ("cvt", ("F2FP", "F2F", "I2F", "F2I", "I2FP", "F2IP", "HADD2.F32")),
    ("prmt", ("PRMT",)),
    ("lds", ("LDS", "LDSM")),
    ("sts", ("STS",)),
    ("glob", ("LDGSTS", "LDG", "LDGDEPBAR", "DEPBAR")),
    ("bar", ("BAR", "WARPSYNC")),
    ("shfl", ("SHFL",)),
    ("fp", ("FMUL", "FADD", "FFMA", "FMNMX", "MUFU", "FSETP", "FSEL", "HMUL2", "HFMA2", "HADD2", "FSWZADD")),
    ("int", ("IMAD", "IADD3", "LOP3", "SHF", "LEA", "ISETP", "SEL", "MOV", "IMNMX", "VIADD", "IABS", "ULDC",
             "UMOV", "UIADD3", "ULOP3", "USHF", "ULEA", "UISETP", "S2R", "S2UR", "CS2R", "R2UR", "PLOP3", "P2R",
             "R2P", "VIMNMX", "UIMAD", "USEL", "IMUL", "UMNMX", "BMSK", "FLO", "POPC", "SGXT", "LOP", "UPRMT")),
)


KERNELS = {"split": _decode_split_kernel, "balanced": _decode_balanced_kernel}


def compile_sm90(const: dict, warps: int, stages: int, kernel=_decode_split_kernel, maxnreg: int | None = None):
    names = list(kernel.arg_names)
    fp8 = const.get("KV_FP8", False)
    const = {k: v for k, v in const.items() if k in names}
    sig = {
        **{n: "i32" for n in names},
        **{k: v for k, v in SIG.items() if k in names},
        **({"cache_ptr": "*fp8e4nv"} if fp8 else {}),
        **{n: "constexpr" for n in const},
    }
    attrs = {
        (names.index(n),): [["tt.divisibility", 16]]
        for n in names
        if (n.endswith("_ptr") or "stride" in n) and n not in const
    }
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def classify(ops: collections.Counter) -> dict:
    out = collections.Counter()
    for op, n in ops.items():
        for name, prefixes in CLASSES:
            if op.split(".")[0] in prefixes or op in prefixes:
                out[name] += n
                break
        else:
            out["other"] += n
    return dict(out)


def stats(compiled) -> dict:
    regs, stack, sass = cubin_facts(compiled)
    loop = max(backward_loops(sass), key=len, default=[])
    ops = opcodes(loop)
    return {"regs": regs, "stack": stack, "smem": compiled.metadata.shared, "loop": len(loop),
            "classes": classify(ops), "ops": ops, "sass": sass}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", help="write each kernel's SASS into this folder")
    ap.add_argument("--fp8-tile", nargs="*", default=["convert", "words", "convert+vt"],
                    choices=[*FP8_TILES, *(f"{t}+vt" for t in FP8_TILES)],
                    help="the kernel's FP8_TILE values to compile (words_bytes: words without its PTX; +vt: V "
                         "transposed in each block, kernels/kv_layout.py)")
    ap.add_argument("--ops", action="store_true", help="also print the loop's full opcode counts")
    ap.add_argument("--launch", nargs="*", default=None, metavar="N,W,S",
                    help="block_n,warps,stages launches (default: 128,4,3 and 64,2,2)")
    ap.add_argument("--model", nargs="*", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--no-bf16", action="store_true", help="only the fp8 paths")
    ap.add_argument("--kernel", choices=list(KERNELS), default="split")
    ap.add_argument("--maxnreg", type=int, nargs="*", default=[0],
                    help="per-thread register caps to compile at (0: none; the balanced launch's at 2 warps: 168 "
                         "for 5 or 6 programs an SM, triton_decode_balanced.max_registers)")
    args = ap.parse_args()
    order = ("HMMA", "cvt", "prmt", "lds", "sts", "glob", "bar", "shfl", "fp", "int", "other")
    print(f"{'config':34s} {'regs':>4} {'stk':>3} {'smem':>6} {'loop':>5} {'/KiB':>5}  "
          + " ".join(f"{c:>5}" for c in order))
    launches = [tuple(int(x) for x in a.split(",")) for a in args.launch] if args.launch else LAUNCHES
    for model in args.model:
        heads = MODELS[model]
        for block_n, warps, stages in launches:
            for cache in ([] if args.no_bf16 else ["bf16"]) + [f"fp8:{p}" for p in args.fp8_tile]:
                fp8 = cache != "bf16"
                # FP8_TILE and V_T always given: under ASTSource a kernel's default constexpr reaches the
                # functions it calls as a bare value (a runtime branch: both arms compiled)
                tile = cache.split(":")[1] if fp8 else "convert"
                const = {**TILE, **heads, "BLOCK_N": block_n, "KV_FP8": fp8, "FP8_TILE": tile.split("+")[0],
                         "V_T": tile.endswith("+vt")}
                for cap in args.maxnreg:
                    s = stats(compile_sm90(const, warps, stages, KERNELS[args.kernel], cap or None))
                    kib = 2 * block_n * 128 * (1 if fp8 else 2) / 1024  # K and V bytes of one tile
                    tag = f"{model} n{block_n} w{warps} s{stages} {cache}" + (f" r{cap}" if cap else "")
                    print(f"{tag:34s} {s['regs']:4d} {s['stack']:3d} {s['smem']:6d} {s['loop']:5d} "
                          f"{s['loop'] * warps / kib:5.0f}  "
                          + " ".join(f"{s['classes'].get(c, 0):5d}" for c in order))
                    if args.ops:
                        print("   ", dict(s["ops"].most_common()))
                    if args.dump:
                        os.makedirs(args.dump, exist_ok=True)
                        name = tag.replace(" ", "_").replace(":", "-") + ".sass"
                        with open(os.path.join(args.dump, name), "w") as f:
                            f.write(s["sass"])
    print("loop: SASS instructions per thread per KV tile; /KiB: warp-instructions per KiB of K+V read")


if __name__ == "__main__":
    main()
