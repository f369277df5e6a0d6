"""Batch-1 decode's fixed cost per layer, kernel by kernel (issue 29), inside CUDA graphs on the GPU.

usage: python tools/bench_decode_fixed_cost.py [--quick]

1. residual add + RMSNorm, then the QKV / gate_up GEMV (two kernels) vs rms_norm_gemv (one), for the W1
   models' shapes, at programs of 4 / 8 / 16 weight rows (BLOCK_N; the layers use 4).
2. decode attention at batch 1 (Llama-3.1-8B / Qwen3-0.6B heads: 8 KV heads, 128 dims) over W1's contexts, at
   the split counts the decode-graph variants bake in (1 = DIRECT_OUT, no reduce kernel): which bounds pay.

The end-to-end A/B is `meshserve bench latency` with the switches (layers/backend_selection.py):
  meshserve bench latency --no-baseline                                          (both off: the default)
  MESHSERVE_NORM_GEMV=1 MESHSERVE_DECODE_CONTEXT_BOUNDS=256,1024 meshserve bench latency --no-baseline
"""

import argparse

import torch
import triton.testing

from meshserve.bench.roofline import measure_copy_bandwidth
from meshserve.kernels.triton_attention import decode_attention
from meshserve.kernels.triton_gemv import gemv, rms_norm_gemv
from meshserve.kernels.triton_ops import rms_norm

SHAPES = {
    "8b qkv": (6144, 4096),
    "8b gate_up": (28672, 4096),
    "qwen qkv": (4096, 1024),
    "qwen gate_up": (6144, 1024),
}


def _us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn) * 1e3


def bench_norm_gemv(bw: float, block_ns) -> None:
    print("norm + projection at batch 1 (us; weight bandwidth / copy bandwidth)")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x, r = (torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        nw = torch.ones(k, device="cuda", dtype=torch.bfloat16)

        def two_kernels(w=w, x=x, r=r, nw=nw):
            normed, _ = rms_norm(x, nw, 1e-5, r)
            return gemv(normed, w)

        row = f"{name:13s} two kernels {_us(two_kernels):6.1f}"
        row += f"  gemv alone {_us(lambda w=w, x=x: gemv(x, w)):6.1f}"
        for bn in block_ns:
            t = _us(lambda w=w, x=x, r=r, nw=nw, bn=bn: rms_norm_gemv(x, r, nw, 1e-5, w, block_n=bn))
            row += f"  fused/{bn} {t:6.1f} ({w.numel() * 2 / (t * 1e-6) / bw:4.0%})"
        print(row)


def bench_decode_attention(contexts, splits_list, block_size: int = 16) -> None:
    print("decode attention, batch 1, 32 heads / 8 KV heads / 128 dims, bf16 (us)")
    kv_heads, heads, dim = 8, 32, 128
    max_ctx = max(contexts)
    blocks = -(-max_ctx // block_size)
    cache = torch.randn(2, blocks + 1, block_size, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    table = (torch.randperm(blocks, device="cuda") + 1).view(1, blocks)
    q = torch.randn(1, heads, dim, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    qsl = torch.arange(2, device="cuda")
    for ctx in contexts:
        seq_lens = torch.tensor([ctx], device="cuda")
        row = f"context {ctx:5d}"
        for s in splits_list:
            t = _us(
                lambda s=s, seq_lens=seq_lens: decode_attention(
                    q, cache, table, seq_lens, qsl, dim**-0.5, None, out, s
                )
            )
            row += f"  {s:2d} splits {t:5.1f}"
        print(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="BLOCK_N 4 only; fewer contexts")
    ns = ap.parse_args()
    bw = measure_copy_bandwidth()
    print(f"{torch.cuda.get_device_name(0)}: copy bandwidth {bw / 1e12:.2f} TB/s")
    bench_norm_gemv(bw, (4,) if ns.quick else (4, 8, 16))
    contexts = (128, 384, 1024) if ns.quick else (128, 256, 384, 512, 768, 1024, 2048)
    bench_decode_attention(contexts, (1, 2, 4, 16))


if __name__ == "__main__":
    main()
