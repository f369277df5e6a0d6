"""Does a memory-bound decode attention overlap a compute-bound GEMM on one GPU? (NanoFlow's idea, issue 29's
W2 8B gap.) At W2's big batches a Llama-3.1-8B decode step is ~half attention at copy bandwidth and ~half
projections at ~480 TFLOP/s (tools/profile_kernels.py, forty-seventh session): if the two ran side by side on
two streams, each nano-batch's attention hiding behind the other's GEMMs, the step would shrink toward the
larger of the two. This times, from CUDA graphs over LAYERS layers (weights cycled over 4 copies so no
projection is an L2 hit):
  seq B     : every layer's qkv, attention, o, gate_up, down at batch B, one stream (today's step, norms aside)
  pair B/2  : nano-batch 1's attention on one stream while nano-batch 2's four projections run on another
  nano B    : two nano-batches of B/2, staggered, so each layer's attention of one runs beside the other's GEMMs
for the balanced decode kernel at several programs an SM (fewer leaves SMs to the GEMMs).
Forty-seventh session, H100 (BENCHMARKS.md): side by side saves 1-1.5% of the sum; half a W2 batch's projections
are memory-bound (they read every weight for half the rows), so the nano-batches lose 34-38%. Refuted below ~2x the
ridge point's rows.

usage (device): python tools/overlap_probe.py [--batch 224] [--ctx 800] [--per-sm 1,2,4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from meshserve.kernels.triton_attention import GRID_TILE
from meshserve.kernels.triton_decode_balanced import decode_attention_balanced
from tools.bench_fp8_step import graph_of, replay_ms

HIDDEN, INTER, HEADS, KV_HEADS, D, BLOCK = 4096, 14336, 32, 8, 128, 16


def make_attention(batch: int, ctx: int):
    per = -(-ctx // BLOCK)
    tables = torch.arange(batch * per, device="cuda", dtype=torch.int32).reshape(batch, per)
    seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    qsl = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, HEADS, D, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(2, batch * per, BLOCK, KV_HEADS, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)

    def attend(per_sm: int):
        decode_attention_balanced(q, cache, tables, seq_lens, qsl, D**-0.5, out, GRID_TILE, per_sm)
    return attend


def make_projections(batch: int):
    ws = [dict(qkv=torch.randn((HEADS + 2 * KV_HEADS) * D, HIDDEN), o=torch.randn(HIDDEN, HEADS * D),
               gate_up=torch.randn(2 * INTER, HIDDEN), down=torch.randn(HIDDEN, INTER)) for _ in range(4)]
    ws = [{k: v.to("cuda", torch.bfloat16) * 0.01 for k, v in w.items()} for w in ws]
    x = torch.randn(batch, HIDDEN, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(batch, HEADS * D, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(batch, INTER, device="cuda", dtype=torch.bfloat16)

    def qkv(layer: int):
        F.linear(x, ws[layer % 4]["qkv"])

    def rest(layer: int):  # o, gate_up, down (the projections after attention)
        w = ws[layer % 4]
        F.linear(a, w["o"])
        F.linear(x, w["gate_up"])
        F.linear(h, w["down"])
    return qkv, rest


def run(batch: int, ctx: int, per_sms: list[int], layers: int) -> list[dict]:
    half = batch // 2
    attend_full, attend_half = make_attention(batch, ctx), make_attention(half, ctx)
    attend_other = make_attention(half, ctx)
    qkv_full, rest_full = make_projections(batch)
    qkv_half, rest_half = make_projections(half)
    qkv_other, rest_other = make_projections(half)
    side = torch.cuda.Stream()
    rows = []

    def timed(name: str, per_sm: int, fn):
        ms = replay_ms(graph_of(fn), iters=10)
        rows.append({"case": name, "per_sm": per_sm, "batch": batch, "ctx": ctx, "layers": layers,
                     "ms": round(ms, 3)})
        print(f"{name:<34} per_sm {per_sm}  {ms:8.3f} ms", flush=True)

    for n in per_sms:
        timed(f"attention alone B={batch}", n, lambda: [attend_full(n) for _ in range(layers)])
        timed(f"attention alone B={half}", n, lambda: [attend_half(n) for _ in range(layers)])
        if n == per_sms[0]:
            timed(f"projections alone B={batch}", 0, lambda: [(qkv_full(i), rest_full(i)) for i in range(layers)])
            timed(f"projections alone B={half}", 0, lambda: [(qkv_half(i), rest_half(i)) for i in range(layers)])

        def seq():
            for i in range(layers):
                qkv_full(i)
                attend_full(n)
                rest_full(i)
        timed(f"seq B={batch}", n, seq)

        def pair():  # attention of one nano-batch beside the projections of the other, layer after layer
            for i in range(layers):
                main = torch.cuda.current_stream()
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    attend_half(n)
                qkv_other(i)
                rest_other(i)
                main.wait_stream(side)
        timed(f"pair B={half}+{half}", n, pair)

        def nano():  # staggered: A's attention beside B's rest + next qkv, then B's attention beside A's
            qkv_half(0)
            for i in range(layers):
                main = torch.cuda.current_stream()
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    attend_half(n)
                rest_other(i - 1) if i else qkv_other(0)
                if i:
                    qkv_other(i)
                main.wait_stream(side)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    attend_other(n)
                rest_half(i)
                if i + 1 < layers:
                    qkv_half(i + 1)
                main.wait_stream(side)
            rest_other(layers - 1)
        timed(f"nano 2 x B={half}", n, nano)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=224)
    ap.add_argument("--ctx", type=int, default=800)
    ap.add_argument("--per-sm", default="1,2,4")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--json", default="")
    ns = ap.parse_args()
    with torch.inference_mode():
        rows = run(ns.batch, ns.ctx, [int(v) for v in ns.per_sm.split(",")], ns.layers)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
