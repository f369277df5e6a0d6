"""Batch-1 projection time (cuBLAS via F.linear vs a Triton GEMV prototype) for the W1 models' shapes.

usage: python tools/bench_gemv.py [--tp N]

--tp N times each rank's share under tensor parallel (column-parallel qkv / gate_up / LM head: N / tp output
rows; row-parallel o / down: K / tp input features): at TP = 2 the 8B's GEMVs reached 84% of the copy
bandwidth in the decode step against 92% at TP = 1, and these shapes are where tiles for TP would be chosen.

Times each [1, K] x [N, K]^T product inside a CUDA graph (no launch overhead) and reports the weight
bandwidth it reaches, beside the copy bandwidth measured on the spot.
"""

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

from meshserve.kernels.triton_gemv import gemv as engine_gemv


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kmask = kk < K
        x = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_w + kk[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, 1).to(y_ptr.dtype.element_ty), mask=rmask)


def gemv(x, w, block_n, block_k, warps, stages):
    n, k = w.shape
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, y, n, k, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                             num_warps=warps, num_stages=stages)
    return y


# name: (N, K, split): the axis tensor parallel cuts ("n": column-parallel, "k": row-parallel)
SHAPES = {"qwen qkv": (4096, 1024, "n"), "qwen o": (1024, 2048, "k"), "qwen gate_up": (6144, 1024, "n"),
          "qwen down": (1024, 3072, "k"), "qwen lm_head": (151936, 1024, "n"),
          "8b qkv": (6144, 4096, "n"), "8b o": (4096, 4096, "k"), "8b gate_up": (28672, 4096, "n"),
          "8b down": (4096, 14336, "k"), "8b lm_head": (128256, 4096, "n")}


def rank_shape(n: int, k: int, split: str, tp: int) -> tuple[int, int]:
    """One rank's (N, K) of a projection under tensor parallel."""
    return (n // tp, k) if split == "n" else (n, k // tp)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1, help="time one rank's share at this tensor parallel size")
    parser.add_argument("--only", default="", help="shapes whose name starts with this (e.g. 8b)")
    args = parser.parse_args()
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / (triton.testing.do_bench(lambda: dst.copy_(src)) * 1e-3)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    configs = [(bn, bk, w, s) for bn in (1, 2, 4, 8) for bk in (256, 512) for w in (4, 8) for s in (3, 4)]
    print(f"tensor parallel {args.tp}: one rank's shapes")
    for name, (n, k, split) in SHAPES.items():
        if not name.startswith(args.only):
            continue
        n, k = rank_shape(n, k, split, args.tp)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        nbytes = w.numel() * 2
        ref = F.linear(x, w)
        t_cublas = triton.testing.do_bench_cudagraph(lambda: F.linear(x, w))  # noqa: B023
        t_engine = triton.testing.do_bench_cudagraph(lambda: engine_gemv(x, w, pdl=False))  # noqa: B023
        best = None
        for cfg in configs:
            try:
                y = gemv(x, w, *cfg)
                if not torch.allclose(y.float(), ref.float(), atol=2e-2, rtol=2e-2):
                    continue
                t = triton.testing.do_bench_cudagraph(lambda: gemv(x, w, *cfg))  # noqa: B023
            except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                print(f"  {name} {cfg}: {type(e).__name__}")
                continue
            if best is None or t < best[0]:
                best = (t, cfg)
        if best is None:
            print(f"{name}: no tile compiled and matched F.linear")
            continue
        print(f"{name:14s} {n:6d} x {k:5d} {nbytes / 2**20:7.1f} MiB  cuBLAS {t_cublas * 1e3:7.1f} us "
              f"({nbytes / (t_cublas * 1e-3) / bw:4.0%})  engine {t_engine * 1e3:7.1f} us "
              f"({nbytes / (t_engine * 1e-3) / bw:4.0%})  best tile {best[0] * 1e3:7.1f} us "
              f"({nbytes / (best[0] * 1e-3) / bw:4.0%}) {best[1]}")


if __name__ == "__main__":
    main()
