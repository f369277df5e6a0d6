"""Static sm_90 numbers of the fused decode launch (kernels/triton_decode_fused.py) beside the plain decode split
kernel, without a GPU: each compiled with Triton's bundled ptxas (as tools/int4_gemv_sass.py), then registers /
stack (cuobjdump -res-usage), shared memory, and from the SASS (nvdisasm) the instructions before the first KV
tile's load (first_tile: what a program runs before its KV stream starts) and before the KV loop (pre_loop, the
software pipeline's prologue included), the KV loop's opcode counts, and the total.

usage: python tools/decode_fused_sass.py [--dump DIR]
Configs: Qwen3-0.6B (16 / 8 heads, q/k norms) and Llama-3.1-8B (32 / 8 heads; bf16 and fp8 cache), head_dim
128, block 16, one split (the direct output: W1's and W2's common launch) and splits (workspace).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["TRITON_INTERPRET"] = "0"

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from meshserve.kernels.triton_attention import _decode_split_kernel
from meshserve.kernels.triton_decode_fused import _decode_fused_split_kernel
from tools.sass_loops import backward_loops, opcodes

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SIG = {
    "qkv_ptr": "*bf16",
    "q_ptr": "*bf16",
    "pos_ptr": "*i64",
    "cos_ptr": "*fp32",
    "sin_ptr": "*fp32",
    "qw_ptr": "*bf16",
    "kw_ptr": "*bf16",
    "slot_ptr": "*i64",
    "cache_ptr": "*bf16",
    "bt_ptr": "*i32",
    "seq_lens_ptr": "*i32",
    "qsl_ptr": "*i32",
    "out_ptr": "*bf16",
    "ws_acc_ptr": "*fp32",
    "ws_ml_ptr": "*fp32",
    "ticket_ptr": "*i32",
    "eps": "fp32",
    "scale_log2": "fp32",
    "k_scale": "fp32",
    "v_scale": "fp32",
    "stride_ckv": "i64",
    "stride_cb": "i64",
}
TILE = {
    "HEAD_DIM": 128,
    "BLOCK_D": 128,
    "BLOCK_SIZE": 16,
    "BLOCK_N": 128,
    "UPCAST_DOT": False,
    "DOT_PRECISION": "tf32",
    "USE_WINDOW": False,
    "KV_FP8": False,
    "USE_GDC": 2,
    "LAST_REDUCES": False,
    "stride_cd": 1,
    "stride_od": 1,
    "stride_qd": 1,
}  # unit strides: specialised to 1 at a real launch
FUSED_ONLY = {"HALF": 64, "PREFETCH_TILES": 2, "PREFETCH_LINE": 64}
MODELS = {
    "qwen": {"NUM_HEADS": 16, "NUM_KV_HEADS": 8, "GROUP": 2, "GROUP_PAD": 2, "ROWS": 16, "HAS_NORM": True},
    "llama": {"NUM_HEADS": 32, "NUM_KV_HEADS": 8, "GROUP": 4, "GROUP_PAD": 4, "ROWS": 16, "HAS_NORM": False},
    # Llama-3.1-8B over an fp8 cache (the fp8 tile conversion; 128-byte K rows: one line each)
    "llama-fp8": {"NUM_HEADS": 32, "NUM_KV_HEADS": 8, "GROUP": 4, "GROUP_PAD": 4, "ROWS": 16, "HAS_NORM": False,
                  "KV_FP8": True, "PREFETCH_LINE": 128},
}


def compile_sm90(kernel, const: dict):
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
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})


def stats(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        use = subprocess.run(
            [f"{BIN}/cuobjdump", "-res-usage", f.name], check=True, capture_output=True, text=True
        ).stdout
        sass = subprocess.run(
            [f"{BIN}/nvdisasm", "-c", f.name], check=True, capture_output=True, text=True
        ).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", use).groups()
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    loops = backward_loops(sass)
    loop = max(loops, key=len, default=[])
    pre = lines.index(loop[0]) if loop else len(lines)
    # the first tile load (cp.async) a program issues: the instructions it runs before its KV stream starts
    first_tile = next((i for i, x in enumerate(lines) if "LDGSTS" in x), len(lines))
    ops = opcodes(loop)
    return {
        "regs": int(regs),
        "stack": int(stack),
        "smem": compiled.metadata.shared,
        "total": len(lines),
        "pre_loop": pre,
        "first_tile": first_tile,
        "loop": len(loop),
        "loop_ops": dict(ops.most_common(12)),
        "bar": sum("BAR" in x for x in lines),
        "sass": sass,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", help="write each kernel's SASS into this folder")
    args = ap.parse_args()
    for model, heads in MODELS.items():
        for direct in (True, False):
            for name, kernel, extra in (
                ("plain", _decode_split_kernel, {}),
                ("fused", _decode_fused_split_kernel, FUSED_ONLY),
            ):
                s = stats(compile_sm90(kernel, {**TILE, **heads, **extra, "DIRECT_OUT": direct}))
                tag = f"{model}-{'1split' if direct else 'splits'}-{name}"
                print(
                    f"{tag:26s} regs {s['regs']} stack {s['stack']} smem {s['smem']} total {s['total']} "
                    f"first_tile {s['first_tile']} pre_loop {s['pre_loop']} loop {s['loop']} BAR {s['bar']} "
                    f"loop_ops {s['loop_ops']}"
                )
                if args.dump:
                    os.makedirs(args.dump, exist_ok=True)
                    with open(os.path.join(args.dump, tag + ".sass"), "w") as f:
                        f.write(s["sass"])


if __name__ == "__main__":
    main()
