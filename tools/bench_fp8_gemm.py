"""Large-batch projection time of fp8 weights against bf16 (issue 20): at W2's batch sizes the simulator's fit says the
engine's fp8 path runs at ~0.95x bf16's FLOP rate (calibration.toml [dtype_time.flops], PLANNER.md) where fp8
tensor cores run at 2x. This times each piece at Llama-3.1-8B's four projections, inside CUDA graphs
(engine/cuda_graph.captured_us), for M rows:

  bf16       torch.nn.functional.linear (cuBLAS), the engine's bf16 path for M > 4
  quant      the per-token activation quantization pass (kernels/triton_fp8_quant.py)
  scaled_mm  torch._scaled_mm on rows already quantized (per-token x per-channel scales, bf16 out)
  fp8        the engine's whole fp8_linear (quant + scaled_mm), as an o_proj runs it (the other three
             projections take pre-quantized rows from the fused norm / SiLU kernels: scaled_mm alone)

and prints per M the four projections summed (one decoder layer) and bf16 / fp8 as a speed-up.

usage: python tools/bench_fp8_gemm.py [--rows 16,64,128,256,512,2048,8192] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
ROWS = (16, 64, 128, 256, 512, 2048, 8192)
# the projections whose input comes quantized from a fused kernel (norm + quant, SiLU + quant)
PREQUANTIZED = ("qkv", "gate_up", "down")


def layer_summary(times: dict) -> dict:
    """times[(proj, kind)] = us -> one decoder layer: each kind summed over the projections, and the layer as the
    engine runs it in fp8 (o through fp8_linear, the others through scaled_mm on pre-quantized rows)."""
    total = {kind: sum(us for (_, k), us in times.items() if k == kind) for kind in ("bf16", "quant", "scaled_mm")}
    engine_fp8 = sum(times[(p, "fp8" if p not in PREQUANTIZED else "scaled_mm")] for p in SHAPES)
    return {**total, "engine_fp8": engine_fp8, "speedup": total["bf16"] / engine_fp8 if engine_fp8 else None}


def bench(rows: tuple[int, ...]) -> list[dict]:
    from meshserve.engine.cuda_graph import captured_us
    from meshserve.kernels.quant_ops import _quantize_activation, fp8_linear
    from meshserve.kernels.quant_ref import quantize_fp8_per_channel

    torch.manual_seed(0)
    weights = {}
    for proj, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq, ws = quantize_fp8_per_channel(w)
        weights[proj] = (w, wq, ws)
    out = []
    for m in rows:
        times = {}
        for proj, (w, wq, ws) in weights.items():
            x = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16)
            xq, xs = _quantize_activation(x, None, fast=True)
            scale_b = ws.float()[None, :]
            times[(proj, "bf16")] = captured_us(lambda x=x, w=w: torch.nn.functional.linear(x, w))
            times[(proj, "quant")] = captured_us(lambda x=x: _quantize_activation(x, None, fast=True))
            times[(proj, "scaled_mm")] = captured_us(
                lambda xq=xq, xs=xs, wq=wq, sb=scale_b: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=sb,
                                                                          out_dtype=torch.bfloat16))
            times[(proj, "fp8")] = captured_us(lambda x=x, wq=wq, ws=ws: fp8_linear(x, wq, ws, None, None, gemv=True))
        row = {"rows": m, "us": {f"{p}/{k}": round(us, 2) for (p, k), us in times.items()}, **layer_summary(times)}
        out.append(row)
        print(f"M {m:>5}: layer bf16 {row['bf16']:8.1f} us | fp8 as the engine runs it {row['engine_fp8']:8.1f} us "
              f"(scaled_mm {row['scaled_mm']:8.1f}, o's quant pass {times[('o', 'quant')]:6.1f}) | "
              f"bf16 / fp8 {row['speedup']:.2f}x", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated row counts (M)")
    p.add_argument("--out", default=None, help="write the timings as JSON here")
    ns = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fp8_gemm.py: needs a CUDA GPU (fp8 tensor cores: sm_89 or newer)")
    result = {"gpu": torch.cuda.get_device_name(), "rows": bench(tuple(int(r) for r in ns.rows.split(",")))}
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
