"""Where the one-launch decoder layer's time goes (MESHSERVE_DECODE_LAYER, kernels/triton_decode_layer.py), on a GPU.

L layers of a model's shapes with random weights (16-bit, or fp8 / INT4 quantized as the engine's dummy weights
are), one sequence at a context, the L launches captured in a CUDA graph: the graph's time a layer; then the same
launches with each program's clocks recorded (decode_layer(timing=...): %clock64 at the start, after PDL's wait,
on arriving at and leaving each grid barrier and at the end; %globaltimer at the start and the end), replayed R
times. Per layer, over programs (cycles turned into us by the SM clock that the two timers give together):
  phase   each program's time from leaving the barrier before to arriving at the one after; the slowest
          program's (max) is the phase's critical path, the median its typical program
  barrier each program's wait from arriving to leaving; the last program to arrive waits least: the minimum is
          the barrier's own cost, the median the imbalance of the phase before it
and each GEMV phase's weight bytes over its critical path against copy bandwidth.

usage: python tools/decode_layer_phases.py [--model qwen3-0.6b|llama-3.1-8b|qwen3-30b-a3b] [--format bf16|fp8|int4]
       [--context 256] [--layers 8] [--tile P,W,V] [--replays 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from meshserve.bench.roofline import measure_copy_bandwidth
from meshserve.kernels.quant_ref import pack_int4_rows, quantize_fp8_per_channel, quantize_int4_groups
from meshserve.kernels.decode_layer_weights import DecodeLayerWeights
from meshserve.kernels.triton_decode_layer import BARRIERS_PER_LAYER, TIMING_SLOTS, decode_layer

# hidden, heads, KV heads, head dim, intermediate (an expert's for MoE), q/k norms, (experts, top k) or None
SHAPES = {
    "qwen3-0.6b": (1024, 16, 8, 128, 3072, True, None),
    "llama-3.1-8b": (4096, 32, 8, 128, 14336, False, None),
    "qwen3-30b-a3b": (2048, 32, 4, 128, 768, True, (128, 8)),
}
BLOCK = 16
INT4_GROUP = 128


def _weights(shape, fmt: str, dt: torch.dtype, device: str = "cuda", group: int = INT4_GROUP) -> DecodeLayerWeights:
    """One layer of the shape (SHAPES) with random weights in the format (quantized as dummy weights are; INT4 in
    groups of `group`)."""
    hidden, heads, kv, d, inter, qk_norm, moe = shape

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, device=device) * scale).to(dt)

    dense = [rnd((heads + 2 * kv) * d, hidden, scale=hidden**-0.5), rnd(hidden, heads * d, scale=(heads * d) ** -0.5)]
    common = dict(q_norm=1 + rnd(d, scale=0.1) if qk_norm else None, k_norm=1 + rnd(d, scale=0.1) if qk_norm else None)
    ln1, ln2 = 1 + rnd(hidden, scale=0.1), 1 + rnd(hidden, scale=0.1)
    if moe:
        experts, top_k = moe
        return DecodeLayerWeights(ln1, dense[0], dense[1], ln2, rnd(experts, 2 * inter, hidden, scale=hidden**-0.5),
                                  rnd(experts, hidden, inter, scale=inter**-0.5), 1e-6,
                                  wr=rnd(experts, hidden, scale=hidden**-0.5), routing=(top_k, True, 1.0), **common)
    mats = dense + [rnd(2 * inter, hidden, scale=hidden**-0.5), rnd(hidden, inter, scale=inter**-0.5)]
    if fmt == "fp8":
        quantized = [quantize_fp8_per_channel(m) for m in mats]
        return DecodeLayerWeights(ln1, quantized[0][0], quantized[1][0], ln2, quantized[2][0], quantized[3][0], 1e-6,
                                  scales=[q[1] for q in quantized], **common)
    if fmt == "int4":
        packed = [quantize_int4_groups(m, group) for m in mats]
        return DecodeLayerWeights(ln1, *(pack_int4_rows(p[0]) for p in packed[:2]), ln2,
                                  *(pack_int4_rows(p[0]) for p in packed[2:]), 1e-6, scales=[p[1] for p in packed],
                                  zeros=[p[2] for p in packed], group_size=group, **common)
    return DecodeLayerWeights(ln1, *mats[:2], ln2, *mats[2:], 1e-6, **common)


def _gemv_bytes(w: DecodeLayerWeights) -> dict[str, int]:
    """Each GEMV phase's weight bytes (a MoE layer's gate/up and down: its chosen experts' rows)."""
    def nbytes(*ts):
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    q = (w.scales or ()) + (w.zeros or ())
    per = {"qkv": nbytes(w.wqkv, *q[0::4]), "o": nbytes(w.wo, *q[1::4])}
    if w.moe:
        top_k, experts = w.routing[0], w.wr.shape[0]
        per.update(router=nbytes(w.wr), gate_up=nbytes(w.wgu) * top_k // experts, down=nbytes(w.wd) * top_k // experts)
    else:
        per.update(gate_up=nbytes(w.wgu, *q[2::4]), down=nbytes(w.wd, *q[3::4]))
    return per


def _phases(rec: list[int], moe: bool) -> tuple[dict[str, int], dict[str, int]]:
    """(phase -> cycles, barrier -> cycles) of one program's record (TIMING_SLOTS)."""
    arrive = {k: rec[2 + 2 * k] for k in range(BARRIERS_PER_LAYER)}
    leave = {k: rec[3 + 2 * k] for k in range(BARRIERS_PER_LAYER)}
    phases = {"start": rec[1] - rec[0], "qkv": arrive[0] - rec[1], "attention": arrive[1] - leave[0],
              "o": arrive[2] - leave[1]}
    if moe:
        phases.update(router=arrive[3] - leave[2], gate_up=arrive[4] - leave[3])
    else:
        phases["gate_up"] = arrive[4] - leave[2]
    phases["down"] = rec[12] - leave[4]
    barriers = {k: leave[k] - arrive[k] for k in range(BARRIERS_PER_LAYER) if moe or k != 3}
    return phases, barriers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--format", choices=("bf16", "fp8", "int4"), default="bf16")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tile", default="1,8,32", help="programs an SM, warps, values a thread a trip")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shape = SHAPES[args.model]
    if shape[6] and args.format != "bf16":
        raise SystemExit("decode_layer_phases: MoE layers run 16-bit weights only")
    per_sm, warps, values = (int(v) for v in args.tile.split(","))
    hidden, heads, kv, d = shape[:4]
    dt = torch.bfloat16
    torch.manual_seed(0)
    layers = [_weights(shape, args.format, dt) for _ in range(args.layers)]
    blocks = -(-args.context // BLOCK) + 1
    caches = [torch.randn(2, blocks, BLOCK, kv, d, device="cuda").to(dt) for _ in layers]
    last = args.context - 1
    positions = torch.tensor([last], device="cuda")
    slot = torch.tensor([(last // BLOCK) * BLOCK + last % BLOCK], device="cuda")
    tables = torch.arange(blocks, dtype=torch.int32, device="cuda")[None]
    seq_lens = torch.tensor([args.context], dtype=torch.int32, device="cuda")
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    emb = torch.outer(torch.arange(args.context + 1, dtype=torch.float32), inv)
    cos, sin = (f(torch.cat((emb, emb), -1)).cuda() for f in (torch.cos, torch.sin))
    bars = torch.zeros(args.layers, BARRIERS_PER_LAYER, dtype=torch.int32, device="cuda")
    programs = per_sm * torch.cuda.get_device_properties(0).multi_processor_count
    clocks = torch.zeros(args.layers, programs, TIMING_SLOTS, dtype=torch.int64, device="cuda")
    h0 = torch.randn(1, hidden, device="cuda").to(dt)

    def step(timed: bool) -> torch.Tensor:
        bars.zero_()
        x = h0
        for i, w in enumerate(layers):
            x = decode_layer(x, w, positions, cos, sin, caches[i], slot, tables, seq_lens, d**-0.5, heads, kv, bars[i],
                             programs_per_sm=per_sm, num_warps=warps, stream_values=values,
                             timing=clocks[i] if timed else None)
        return x

    graphs = {}
    for timed in (False, True):
        step(timed)  # compiles and checks the one wave outside the capture
        torch.cuda.synchronize()
        graphs[timed] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[timed]):
            step(timed)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        graphs[False].replay()
    start.record()
    for _ in range(args.replays):
        graphs[False].replay()
    end.record()
    torch.cuda.synchronize()
    layer_us = start.elapsed_time(end) * 1e3 / args.replays / args.layers

    phase_cycles: dict[str, list[list[int]]] = {}  # phase -> per (replay, layer): the programs' cycles
    barrier_cycles: dict[int, list[list[int]]] = {}
    ghz, spans = [], []
    for _ in range(args.replays):
        graphs[True].replay()
        torch.cuda.synchronize()
        recs = clocks.cpu().tolist()
        for layer in recs:
            per_program = [_phases(rec, bool(shape[6])) for rec in layer]
            for name in per_program[0][0]:
                phase_cycles.setdefault(name, []).append([p[0][name] for p in per_program])
            for k in per_program[0][1]:
                barrier_cycles.setdefault(k, []).append([p[1][k] for p in per_program])
            ns = [rec[14] - rec[13] for rec in layer]
            ghz += [(rec[12] - rec[0]) / n for rec, n in zip(layer, ns) if n > 0]
            spans.append(max(rec[14] for rec in layer) - min(rec[13] for rec in layer))
    clock = statistics.median(ghz)  # cycles a ns: the SM clock in GHz
    copy = measure_copy_bandwidth()
    nbytes = _gemv_bytes(layers[0])

    def us(cycles: float) -> float:
        return cycles / clock / 1e3

    rows = {}
    print(f"{args.model} {args.format}, context {args.context}, {args.layers} layers, tile {args.tile}, "
          f"{programs} programs; SM clock {clock:.2f} GHz, copy {copy / 1e12:.2f} TB/s")
    print(f"graph: {layer_us:.2f} us a layer; timed launches' span (globaltimer) median "
          f"{statistics.median(spans) / 1e3:.2f} us a layer")
    print(f"{'phase':12s} {'max us':>8s} {'median us':>10s} {'bytes MB':>9s} {'% of copy':>10s}")
    for name, runs in phase_cycles.items():
        crit = statistics.median(max(r) for r in runs)
        typical = statistics.median(statistics.median(r) for r in runs)
        b = nbytes.get(name)
        share = f"{100 * b / (us(crit) * 1e-6) / copy:9.1f}%" if b else ""
        rows[name] = dict(max_us=us(crit), median_us=us(typical), bytes=b)
        print(f"{name:12s} {us(crit):8.2f} {us(typical):10.2f} {(b or 0) / 1e6:9.2f} {share:>10s}")
    print(f"{'barrier':12s} {'min us':>8s} {'median us':>10s}")
    for k, runs in barrier_cycles.items():
        own = statistics.median(min(r) for r in runs)
        typical = statistics.median(statistics.median(r) for r in runs)
        rows[f"barrier {k}"] = dict(min_us=us(own), median_us=us(typical))
        print(f"{'barrier ' + str(k):12s} {us(own):8.2f} {us(typical):10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), layer_us=layer_us, sm_ghz=clock, copy_bytes_s=copy, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
