"""Batch-1 FP8-weight GEMV in Triton: y[1, N] = x[1, K] @ (W_fp8[N, K] * scale[N])^T (+ bias), weight-only (the
16-bit row is not quantized), fp32 sums, the per-channel scale applied once per output. Two variants of the
weight decode and product, selectable for A/B on the device (tools/bench_quant_gemv.py, MESHSERVE_FP8_GEMV):

  cvt   w.to(fp32) per weight (the first kernel): on sm_90 a packed F2FP e4m3x2 -> f16x2 and one HADD2.F32
        f16 -> f32 per weight. If conversions issue at 16 / clock / SM (about the rate the weight bytes arrive
        at 4+ TB/s) they capped the first kernel at 56% of the fp8 roofline on an H200; its tile shape cost
        more (default_fp8_tiles).
  half  the packed F2FP e4m3x2 -> f16x2, then packed fp16 products (HMUL2 / HFMA2: two weights an instruction)
        summed in fp16 over chunks of HALF_CHUNK weights, each chunk sum added to an fp32 accumulator
        (~2.2-2.6 sm_90 instructions per weight vs cvt's ~3.4). Each step's slice of x is scaled so that its
        largest |x| is HALF_X_MAX (32): products (|w| <= 448) summed HALF_CHUNK (4) at a time stay below
        4 * 448 * 32 = 57,344 < 65,504 whatever the activations (an earlier fixed x / 64 overflowed for
        |x| > ~2,300, which outlier features reach), and the scale goes back in fp32. Values below ~2e-6 of
        the step's largest |x| fall into fp16 subnormals: their share of the sum is below fp16's rounding.

Two more (bits: the e4m3 bits moved into an fp32 with integer ops; dot: tensor cores on a 16-row tile) lost on
the H200 and were removed (QUANTIZATION.md). Both variants take GemvTiles (block_n rows, block_k features per
step, split_k K ranges: gemv_tiles.py); one kernel serves both (its HALF constexpr).
Reference: quant_ref.fp8_weight_only_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.gemv_tiles import GemvTiles, split_k_range, split_k_reduce

FP8_GEMV_VARIANTS = ("cvt", "half")
HALF_CHUNK = tl.constexpr(4)  # fp16 products summed in fp16 before an fp32 add (the half variant)
HALF_X_MAX = tl.constexpr(32.0)  # the half variant scales x so its largest |x| is this: 4 * 448 * 32 < 65,504


@triton.jit
def _finish(y, rows, rmask, s_ptr, b_ptr, out_ptr, pid_k, N, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Split: the fp32 partial to out[pid_k, rows]; else y * scale (+ bias) rounded to out's dtype."""
    if SPLIT:
        tl.store(out_ptr + pid_k * N + rows, y, mask=rmask)
    else:
        y = y * tl.load(s_ptr + rows, mask=rmask, other=0.0)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    N,
    K,
    stride_w,
    k_per_split,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """HALF: the half variant's fp16 products, else cvt's fp32 ones (module docstring)."""
    pid_k = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    if HALF:
        acc = tl.zeros([BLOCK_N, BLOCK_K // HALF_CHUNK], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + ks
        kmask = kk < k_hi
        if EVEN:
            x = tl.load(x_ptr + kk).to(tl.float32)
            w = tl.load(w_rows + kk[None, :])
        else:
            x = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if HALF:
            # x scaled per step so that max |x| is HALF_X_MAX: fp16 products cannot overflow (module docstring)
            step_scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-30) * (1.0 / HALF_X_MAX)
            xh = (x * (1.0 / step_scale)).to(tl.float16)
            p = tl.reshape(w.to(tl.float16) * xh[None, :], [BLOCK_N, BLOCK_K // HALF_CHUNK, HALF_CHUNK])
            acc += tl.sum(p, 2, dtype=tl.float16).to(tl.float32) * step_scale
        else:
            acc += w.to(tl.float32) * x[None, :]
    _finish(tl.sum(acc, 1), rows, rmask, s_ptr, b_ptr, out_ptr, pid_k, N, HAS_BIAS, SPLIT)


def default_fp8_tiles(variant: str, n: int, k: int) -> GemvTiles:
    """Best guesses until the H200 sweep (tools/bench_quant_gemv.py) picks them per variant. In sm_90 code the
    first kernel's 4 x 1,024 tile on 8 warps spent ~4.7 instructions per weight in its loop: x, loaded 4 values
    a thread, went through shared memory (and a barrier) every step to reach the weight tile's layout of 16 a
    thread replicated over the warps. 4 x 2,048 on 4 warps puts the warps along K, so x's own load layout is
    already the weight tile's: ~3.4 per weight, 64 weights a thread a step, 106 registers."""
    return GemvTiles(4, 2048, num_warps=4, num_stages=3)


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    variant: str = "cvt",
    tiles: GemvTiles | None = None,
) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] float8_e4m3fn, weight_scale [N] -> [..., N] in x.dtype."""
    n, k = weight.shape
    if x.numel() != k:
        raise ValueError(f"fp8_gemv takes one row of {k} features, got shape {tuple(x.shape)}")
    if variant not in FP8_GEMV_VARIANTS:
        raise ValueError(f"unknown fp8 GEMV variant {variant!r} ({', '.join(FP8_GEMV_VARIANTS)})")
    x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    tiles = tiles or default_fp8_tiles(variant, n, k)
    scale = weight_scale.float().contiguous()
    per_split, splits = split_k_range(k, tiles)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    out = torch.empty((splits, 1, n), dtype=torch.float32, device=x.device) if splits > 1 else y
    _fp8_gemv_kernel[(triton.cdiv(n, tiles.block_n), splits)](
        x,
        weight,
        scale,
        bias if bias is not None else x,
        out,
        n,
        k,
        weight.stride(0),
        per_split,
        HAS_BIAS=bias is not None,
        SPLIT=splits > 1,
        EVEN=n % tiles.block_n == 0 and per_split * splits == k,
        HALF=variant == "half",
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    if splits > 1:
        split_k_reduce(out, y.view(1, n), scale, bias)
    return y
