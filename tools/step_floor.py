"""A step trace against its floor, step by step: where an offline run's GPU time sits above the bytes and FLOPs its
steps must move (issue 29's "where W2's time goes").

usage: python tools/step_floor.py STEPS.jsonl.gz MODEL [--bandwidth-tbps 4.28] [--tflops 989] [--skip N]

STEPS is `meshserve bench throughput --step-trace FILE` (or `serve --step-trace`): each step's shape and its GPU
time (CUDA events). A step's floor is the larger of its bytes (the model's weights plus its KV context, read at the
copy bandwidth measured on the device) and its FLOPs at the dense 16-bit peak: 2 x the layers' active parameters x
its tokens plus 2 x the LM head's x its sequences (the head runs on one token a sequence; the embedding is a lookup;
attention's own FLOPs, which the trace cannot tell without each prompt's length, left out: a lower bound);
prints a markdown table by kind (steps carrying prefill; decode steps by rows) with the GPU time, the floor, the
KV share of it and their ratio, and the GPU's busy share of the trace's span. bf16 weights and KV (the planner's
shard of MODEL at TP=1). --skip N drops the first N steps: `bench throughput`'s trace starts with its warm-up
(4 prompts, 8 tokens each: 8 steps), then an idle gap while the timed run is queued, both outside W2's time.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from meshserve.planner.memory import stage_shard
from meshserve.planner.model import load_model
from meshserve.planner.parallel import Layout
from meshserve.simulator.step_cost import read_step_trace

KINDS = ("prefill (mixed)", "decode 256+", "decode 128-255", "decode 32-127", "decode 1-31")


def kind_of(row: dict) -> str:
    if row["tokens"] > row["seqs"]:
        return KINDS[0]
    n = row["seqs"]
    return KINDS[1] if n >= 256 else KINDS[2] if n >= 128 else KINDS[3] if n >= 32 else KINDS[4]


def floor_table(rows: list[dict], weight_bytes: float, kv_bytes_per_token: float,
                matmul_flops: Callable[[int, int], float], bandwidth: float,
                flops: float) -> tuple[dict[str, list[float]], float]:
    """{kind: [steps, GPU s, floor s, KV s]} and the GPU's busy share of the trace's span. matmul_flops(tokens,
    sequences): a step's GEMM FLOPs (ModelSpec.matmul_flops: the LM head once a sequence)."""
    table = {k: [0, 0.0, 0.0, 0.0] for k in KINDS}
    for r in rows:
        kv = r["context"] * kv_bytes_per_token / bandwidth
        floor = max(weight_bytes / bandwidth + kv, matmul_flops(r["tokens"], r["seqs"]) / flops)
        t = table[kind_of(r)]
        t[0] += 1
        t[1] += r["actual_s"]
        t[2] += floor
        t[3] += kv
    span = rows[-1]["t"] - rows[0]["t"] + rows[0]["actual_s"] if rows else 0.0
    busy = sum(r["actual_s"] for r in rows) / span if span > 0 else 0.0
    return {k: v for k, v in table.items() if v[0]}, busy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("model")
    p.add_argument("--bandwidth-tbps", type=float, default=4.28, help="copy bandwidth measured on the device")
    p.add_argument("--tflops", type=float, default=989.0, help="dense 16-bit peak (the data sheet's)")
    p.add_argument("--skip", type=int, default=0, help="leading steps to drop (bench throughput's warm-up: 8)")
    ns = p.parse_args()
    model = load_model(ns.model)
    shard = stage_shard(model, Layout(), 0)
    rows = read_step_trace(ns.trace)[ns.skip:]
    table, busy = floor_table(rows, shard.weight_bytes, shard.kv_bytes_per_token, model.matmul_flops,
                              ns.bandwidth_tbps * 1e12, ns.tflops * 1e12)
    print(f"| {ns.model} steps | count | GPU s | floor s | of which KV | GPU / floor |\n|---|---|---|---|---|---|")
    total = [0, 0.0, 0.0]
    for kind, (n, gpu, floor, kv) in table.items():
        total = [total[0] + n, total[1] + gpu, total[2] + floor]
        print(f"| {kind} | {n} | {gpu:.2f} | {floor:.2f} | {kv:.2f} | {gpu / floor:.2f}x |")
    print(f"| all | {total[0]} | {total[1]:.2f} | {total[2]:.2f} | | {total[1] / total[2]:.2f}x |")
    print(f"\nGPU busy {busy:.1%} of the trace's span")


if __name__ == "__main__":
    main()
