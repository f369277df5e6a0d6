"""Where an fp8 GEMM's error against the exact sum comes from (issue 20; the forty-ninth session's open question).

On an H100 torch._scaled_mm (per-token x per-channel scales, bf16 out) sat up to 0.04-0.07 of each output's
products' root sum of squares (RSS) from fp8_linear_ref's fp32 sum, at K 576 to 14,336 alike: more than Hopper's
reduced-precision fp8 accumulation should give at small K. This separates the candidates on the device, per
shape, over the same quantized operands:

  exact      the fp64 sum of the fp8 products, times both scales (the truth)
  ref        fp8_linear_ref (fp32 matmul on the GPU, bf16 out): its own rounding
  ref_fp32   the same in fp32 out: the bf16 rounding removed
  scaled_mm  torch._scaled_mm, use_fast_accum False (the engine's) and True
  triton     the Triton rowwise GEMM (kernels/triton_decode_gemm.py: promotes its fp32 sum every K tile)
  engine     quant_ops.fp8_linear as the kernel tests call it (Triton quantization + _scaled_mm), against the
             truth of the reference's x (what the tests bound) and of its own x (engine_own_x: the GEMM alone)

For each: the largest error and the 99.9th percentile, in RSS units and absolute; and where the quantized x
of the engine's Triton quantization differs from the reference's (x_diff: how many elements, how many e4m3 steps).
Usage (device, repo root): python3 tools/fp8_gemm_error.py [--rows 64,256] [--shapes 1024x4096,...] [--json F]
"""

from __future__ import annotations

import argparse
import json

import torch

from meshserve.kernels.quant_ref import fp8_linear_ref, quantize_fp8_per_channel, quantize_fp8_per_token

SHAPES = "576x1536,1024x4096,3072x1024,4096x6144,14336x4096"  # K x N: the kernel tests' and Llama-3.1-8B's


def _errors(out: torch.Tensor, exact: torch.Tensor, rss: torch.Tensor) -> dict:
    err = (out.double() - exact).abs()
    rel = err / rss
    return {"max_rss": float(rel.max()), "p999_rss": float(rel.flatten().quantile(0.999)),
            "max_abs": float(err.max())}


def measure(m: int, k: int, n: int, seed: int = 0) -> dict:
    from meshserve.kernels.quant_ops import _quantize_activation, fp8_linear
    from meshserve.kernels.triton_decode_gemm import fp8_rowwise_gemm

    g = torch.Generator(device="cuda").manual_seed(seed)
    wq, ws = quantize_fp8_per_channel(torch.randn(n, k, device="cuda", generator=g) * 0.02)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    xq, xs = quantize_fp8_per_token(x)
    fq, fs = _quantize_activation(x, None, fast=True)
    # fp8 x fp8 products are exact in fp64, and so, to ~1e-16, are their sums over K <= 16k
    scale = xs.double() * ws.double()[None, :]
    exact = (xq.double() @ wq.double().t()) * scale
    rss = (xq.double().square() @ wq.double().square().t()).sqrt() * scale
    row = {"m": m, "k": k, "n": n, "output_std": float(exact.std()), "x_diff": _x_diff(fq, xq)}
    row["ref"] = _errors(fp8_linear_ref(x, wq, ws), exact, rss)
    row["ref_fp32"] = _errors((xq.float() @ wq.float().t()) * xs * ws.float()[None, :], exact, rss)
    for fast in (False, True):
        out = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.float()[None, :], out_dtype=torch.bfloat16,
                               use_fast_accum=fast)
        row[f"scaled_mm{'_fast' if fast else ''}"] = _errors(out, exact, rss)
    out = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.float()[None, :], out_dtype=torch.float32)
    row["scaled_mm_fp32_out"] = _errors(out, exact, rss)
    row["triton"] = _errors(fp8_rowwise_gemm(xq, xs, wq, ws, None, torch.bfloat16), exact, rss)
    # the layer as the kernel tests call it (Triton quantization, then _scaled_mm): against the truth of the
    # reference's x (what the tests measure) and of its own x (the GEMM's error alone)
    engine = fp8_linear(x, wq, ws, None, None, gemv=True)
    row["engine"] = _errors(engine, exact, rss)
    own = (fq.double() @ wq.double().t()) * (fs.double() * ws.double()[None, :])
    own_rss = (fq.double().square() @ wq.double().square().t()).sqrt() * (fs.double() * ws.double()[None, :])
    row["engine_own_x"] = _errors(engine, own, own_rss)
    return row


def _x_diff(fq: torch.Tensor, xq: torch.Tensor) -> dict:
    """How the Triton quantization's fp8 x differs from the reference's: how many elements, how far in e4m3 steps
    (same-sign codes are ordered by magnitude) and how many of them rounded toward zero (a truncating cast)."""
    a, b = fq.view(torch.uint8).int(), xq.view(torch.uint8).int()
    diff = a != b
    n = int(diff.sum())
    steps = ((a & 0x7F) - (b & 0x7F))[diff]
    return {"count": n, "of": fq.numel(), "max_steps": int(steps.abs().max()) if n else 0,
            "toward_zero": float((steps < 0).float().mean()) if n else 0.0,
            "sign_differs": int(((a ^ b) & 0x80).bool().sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="64,256")
    p.add_argument("--shapes", default=SHAPES, help="KxN,... (default: %(default)s)")
    p.add_argument("--json", default=None)
    ns = p.parse_args()
    rows = []
    for m in (int(v) for v in ns.rows.split(",")):
        for shape in ns.shapes.split(","):
            k, n = (int(v) for v in shape.split("x"))
            row = measure(m, k, n)
            rows.append(row)
            cols = " ".join(f"{name} {row[name]['max_rss']:.4f}/{row[name]['p999_rss']:.4f}"
                            for name in ("ref", "ref_fp32", "scaled_mm", "scaled_mm_fast", "scaled_mm_fp32_out",
                                         "triton", "engine", "engine_own_x"))
            xd = row["x_diff"]
            print(f"M {m} K {k} N {n} x differs at {xd['count']}/{xd['of']} (max {xd['max_steps']} steps, "
                  f"{xd['toward_zero']:.0%} toward zero) std {row['output_std']:.3f} | max/p99.9 in RSS: {cols}",
                  flush=True)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
