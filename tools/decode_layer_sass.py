"""Static sm_90 readings of the decode layer kernel's GEMV trips, without a GPU (issues 20, 29): the kernel
(kernels/triton_decode_layer.py) compiled one phase at a time with Triton's bundled ptxas, as decode_layer
launches it on an H200 (132 programs of 8 warps, one an SM), and each phase's streamed trip read from its SASS:
instructions, instructions a weight, barriers, loads and shared-memory traffic.

usage: python tools/decode_layer_sass.py [--model llama-3.1-8b|qwen3-0.6b|qwen3-30b-a3b] [--formats bf16,fp8,int4]
                                         [--values 32] [--dump DIR]

A trip is an innermost loop doing a tile's products (HFMA2 or FFMA) without the block's closing reduction
(SHFL); weights a trip = the tile's weights / 256 threads. A phase of a few trips over a constant K (Qwen3-0.6B's,
most of Qwen3-30B-A3B's) is unrolled: no loop to read. What to read: instructions a weight against the
bytes (a thread of an H200's 16,896 issuing per clock at ~1.98 GHz: ~33.5 G weights a second at 1 instruction a
weight) and barriers, which stop a program's every warp (one program an SM: nothing else to issue meanwhile).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from meshserve.kernels.triton_decode_layer import _decode_layer_kernel
from meshserve.kernels.triton_decode_layer_gemv import phase_tiles
from tools.sass_loops import backward_loops, cubin_facts, opcodes

# (hidden, intermediate, heads, KV heads, head dim, q/k norm, experts, top k): experts 0 a dense layer
MODELS = {"llama-3.1-8b": (4096, 14336, 32, 8, 128, False, 0, 0), "qwen3-0.6b": (1024, 3072, 16, 8, 128, True, 0, 0),
          "qwen3-30b-a3b": (2048, 768, 32, 4, 128, True, 128, 8)}
PHASES = {0: "QKV", 2: "O", 3: "RT", 4: "GU", 5: "D"}
INT4_GROUP = 128
PROGRAMS, WARPS = 132, 8


def signature(fmt: str) -> dict:
    """The kernel's non-i32 argument types for a 16-bit (bf16) layer with fp8 or INT4 projections."""
    sig = {n: "*bf16" for n in _decode_layer_kernel.arg_names if n.endswith("_ptr")}
    sig.update(pos_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32", slot_ptr="*i64", bt_ptr="*i64",
               seq_lens_ptr="*i64", bar_ptr="*i32", time_ptr="*i64", ws_acc_ptr="*fp32", ws_ml_ptr="*fp32",
               ticket_ptr="*i32", load_ptr="*i64", xs_ptr="*i32", eps="fp32", qk_eps="fp32", scale_log2="fp32",
               k_scale="fp32", v_scale="fp32", route_scale="fp32", stride_ckv="i64", stride_cb="i64")
    if fmt != "bf16":
        sig.update({n: "*i32" for n in ("wqkv_ptr", "wo_ptr", "wgu_ptr", "wd_ptr")})
        sig.update({n: "*fp16" if fmt == "int4" else "*fp32" for n in ("sqkv_ptr", "so_ptr", "sgu_ptr", "sd_ptr")})
        sig.update({n: "*fp16" for n in ("zqkv_ptr", "zo_ptr", "zgu_ptr", "zd_ptr")})
    return sig


def layer_consts(model: str, fmt: str, values: int = 32) -> dict:
    """decode_layer's constexprs for a dense layer of `model` (bf16 row, bf16 cache) in `fmt`, every phase's tile
    as decode_layer picks it on 132 SMs."""
    hidden, inter, heads, kv_heads, head_dim, qk_norm, experts, top_k = MODELS[model]
    if experts and fmt != "bf16":
        raise SystemExit(f"{model}: the kernel's MoE layers are 16-bit only")
    consts = dict(HIDDEN=hidden, INTER=inter, NUM_HEADS=heads, NUM_KV_HEADS=kv_heads, GROUP=heads // kv_heads,
                  ROWS=16, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_SIZE=16, BLOCK_N=64, BLOCK_H=hidden,
                  ATTN_SPLITS=8, HAS_QKV_BIAS=False, HAS_O_BIAS=False, HAS_GU_BIAS=False, HAS_D_BIAS=False,
                  HAS_NORM=qk_norm, UPCAST_DOT=False, DOT_PRECISION="tf32", KV_FP8=False, FP8_TILE="convert",
                  V_T=False, USE_GDC=0, MOE=bool(experts), NUM_EXPERTS=max(experts, 1),
                  TOP_K=max(top_k, 1), RENORMALIZE=bool(experts), BLOCK_E=max(experts, 1), BLOCK_TOPK=max(top_k, 1),
                  COUNT_LOAD=False, W_FP8=fmt == "fp8", W_INT4=fmt == "int4",
                  INT4_GROUP=INT4_GROUP if fmt == "int4" else 1, ASM=fmt != "bf16", TIMING=False)
    consts.update(phase_tiles((heads + 2 * kv_heads) * head_dim, heads * head_dim, hidden, inter, max(top_k, 1),
                              max(experts, 1), bool(experts), fmt, INT4_GROUP, PROGRAMS, 32 * WARPS, values))
    return consts


def compile_phase(consts: dict, fmt: str, phase: int):
    """The kernel of one phase (PHASE_LO = PHASE_HI = phase) for sm_90, specialised as the launcher does it."""
    kernel = _decode_layer_kernel
    names = list(kernel.arg_names)
    const = dict(consts, PHASE_LO=phase, PHASE_HI=phase)
    sig = {**{n: "i32" for n in names}, **signature(fmt), **{n: "constexpr" for n in const}}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or "stride" in n}
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": WARPS, "num_stages": 1})


def _count(ops, name: str) -> int:
    return sum(v for op, v in ops.items() if op.split(".")[0] == name)


def trip_loops(sass: str) -> list:
    """The opcode counts of each streamed trip: innermost loops with a tile's products (HFMA2 / FFMA) and no
    reduction (SHFL)."""
    loops = [opcodes(body) for body in backward_loops(sass)]
    return [ops for ops in loops if _count(ops, "SHFL") == 0 and _count(ops, "HFMA2") + _count(ops, "FFMA") >= 16]


def trip_weights(consts: dict, fmt: str, phase: int) -> int:
    """Weights a thread takes a trip in the phase's tile."""
    name = PHASES[phase]
    rows, block_k = consts[f"R_{name}"], consts[f"K_{name}"]
    per_tile = {"bf16": rows * block_k, "fp8": rows * block_k * 4, "int4": rows * block_k * INT4_GROUP}[fmt]
    return per_tile // (32 * WARPS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(MODELS))
    ap.add_argument("--formats", default="bf16,fp8,int4")
    ap.add_argument("--values", type=int, default=32, help="16-bit values' bytes a thread streams a trip")
    ap.add_argument("--dump", help="write each phase's SASS here")
    args = ap.parse_args()
    print(f"{args.model}, one program of {WARPS} warps on each of {PROGRAMS} SMs, {args.values} values a trip")
    print("| format | phase | tile (rows or columns, K a trip) | registers | trip instructions | weights a thread |"
          " instructions a weight | BAR | LDG | LDS + STS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for fmt in args.formats.split(","):
        consts = layer_consts(args.model, fmt, args.values)
        for phase, name in PHASES.items():
            if phase == 3 and not consts["MOE"]:
                continue
            regs, _, sass = cubin_facts(compile_phase(consts, fmt, phase))
            if args.dump:
                os.makedirs(args.dump, exist_ok=True)
                with open(os.path.join(args.dump, f"{args.model}_{fmt}_{name}.sass"), "w") as f:
                    f.write(sass)
            weights = trip_weights(consts, fmt, phase)
            trips = trip_loops(sass)
            if not trips:  # a few trips of a constant K: ptxas unrolled them, no loop to read
                print(f"| {fmt} | {name} | {consts[f'R_{name}']}, {consts[f'K_{name}']} | {regs} | unrolled | "
                      f"{weights} | | | | |")
            for ops in trips[:1]:  # (the loop's copies read alike)
                n = sum(ops.values())
                print(f"| {fmt} | {name} | {consts[f'R_{name}']}, {consts[f'K_{name}']} | {regs} | {n} | {weights} | "
                      f"{n / weights:.2f} | {_count(ops, 'BAR')} | {_count(ops, 'LDG')} | "
                      f"{_count(ops, 'LDS') + _count(ops, 'STS')} |")


if __name__ == "__main__":
    main()
