"""Static sm_90 numbers of the batch-1 int4 GEMV kernels, without a GPU (issue 20): each kernel compiled with
Triton's bundled ptxas, then registers / stack spills (cuobjdump -res-usage) and the instruction mix of the
K loop (nvdisasm: the largest backward-branch loop), per weight a thread decodes in one loop step.

usage: python tools/int4_gemv_sass.py [--rows 1] [--dump DIR]

The loop of every kernel handles BLOCK_KP packed rows x 4 columns (one 128-bit load per packed row) per thread
per step, i.e. 32 * BLOCK_KP weights: instructions / that = instructions per weight.
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

from meshserve.kernels import triton_int4_gemv as i4
from tools.sass_loops import backward_loops, cubin_facts, opcodes

POINTERS = {
    "x_ptr": "*bf16",
    "qw_ptr": "*i32",
    "s_ptr": "*fp16",
    "z_ptr": "*fp16",
    "perm_ptr": "*i32",
    "g_ptr": "*i32",
    "b_ptr": "*bf16",
    "y_ptr": "*bf16",
    "part_ptr": "*fp32",
    "cnt_ptr": "*i32",
}
ALIGNED = {"N", "K", "stride_qk", "stride_sg", "stride_ym", "stride_xm", "kp_per_split", "magic"}


def compile_sm90(kernel, const: dict, warps: int):
    names = list(kernel.arg_names)
    sig = {n: "i32" for n in names}
    sig.update({n: t for n, t in POINTERS.items() if n in names})
    sig.update({n: "constexpr" for n in const})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in set(POINTERS) | ALIGNED if n in names}
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3}
    )


def stats(compiled) -> tuple[str, str, collections.Counter, str]:
    """(registers, stack bytes, opcode counts of the largest loop) of a compiled kernel, and its SASS."""
    regs, stack, sass = cubin_facts(compiled)
    ops = opcodes(max(backward_loops(sass), key=len, default=[]))
    return str(regs), str(stack), ops, sass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1, help="BLOCK_M: rows of x (decode batch, <= 4)")
    ap.add_argument("--dump", help="write each kernel's SASS into this folder")
    args = ap.parse_args()
    m = args.rows
    common = {"HAS_BIAS": False, "SPLIT": True, "FUSED_REDUCE": True, "BLOCK_M": m}
    kernels = {  # name: (kernel, constexprs, warps, packed rows a step)
        f"half 128x{8 * kp} w1 (default, {'1-2' if kp == 8 else '3-4'} rows)": (
            i4._int4_gemv_half_kernel,
            dict(common, EVEN=True, GROUP=128, ASM=True, BLOCK_N=128, BLOCK_KP=kp, REDUCE_CHUNK=8, HAS_PERM=False),
            1,
            kp,
        )
        for kp in (8, 4)
    }
    kernels["half 128x64 w1 perm (act-order sorted)"] = (
        i4._int4_gemv_half_kernel,
        dict(common, EVEN=True, GROUP=128, ASM=True, BLOCK_N=128, BLOCK_KP=8, REDUCE_CHUNK=8, HAS_PERM=True),
        1,
        8,
    )
    kernels["grouped 128x32 w1 (act-order)"] = (
        i4._int4_gemv_grouped_kernel,
        dict(common, HAS_G_IDX=True, PRMT=True, BLOCK_N=128, BLOCK_KP=4),
        1,
        4,
    )
    print(f"sm_90, {m} row(s): registers, stack bytes, loop instructions per weight, top opcodes")
    for name, (kernel, const, warps, kp) in kernels.items():
        regs, stack, ops, sass = stats(compile_sm90(kernel, const, warps))
        weights = 32 * kp  # 4 columns x 8 nibbles per packed row and thread
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
        print(
            f"{name:30s} regs {regs:>3s} stack {stack:>3s}  {sum(ops.values()) / weights:4.2f} / weight  {top}"
        )
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, re.sub(r"[^\w.-]+", "_", name).strip("_") + ".sass"), "w") as f:
                f.write(sass)


if __name__ == "__main__":
    main()
