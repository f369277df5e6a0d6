"""Batch-1 FP8-weight GEMV in Triton: y[1, N] = x[1, K] @ (W_fp8[N, K] * scale[N])^T (+ bias), weight-only (the
16-bit row is not quantized), fp32 sums, the per-channel scale applied once per output. Four variants of the
weight decode and product, selectable for A/B on the device (tools/bench_quant_gemv.py, MESHSERVE_FP8_GEMV):

  cvt   w.to(fp32) per weight (the first kernel): on sm_90 a packed F2FP e4m3x2 -> f16x2 and one HADD2.F32
        f16 -> f32 per weight. If conversions issue at 16 / clock / SM (about the rate the weight bytes arrive
        at 4+ TB/s) they capped the first kernel at 56% of the fp8 roofline on an H200; its tile shape cost
        more (default_fp8_tiles).
  bits  no conversion instruction: the weight is read as int32 words (4 fp8 each) and each byte's sign,
        exponent and mantissa are moved into the bit positions of an fp32 with shifts and masks (2-3 integer
        ops, 64 / clock / SM; ~2 more instructions per weight than cvt in sm_90 code). The fp32 so built has
        the e4m3 exponent with the fp32 bias, i.e. it is w * 2^-120 (subnormal e4m3 values land on fp32
        subnormals, exactly); x is multiplied by 2^64 up front so products stay normal, and 2^56 goes into the
        final scale.
  dot   the packed cvt e4m3x2 -> f16x2 only (half a conversion per weight), then tensor cores: x is row 0 of a
        16-row fp16 tile, tl.dot accumulates in fp32 (no fp16 products to overflow). x is rounded to fp16
        (exact for bf16 values in fp16's normal range, |x| in [6e-5, 65504]).

  half  the packed F2FP e4m3x2 -> f16x2, then packed fp16 products (HMUL2 / HFMA2: two weights an instruction)
        summed in fp16 over chunks of HALF_CHUNK weights, each chunk sum added to an fp32 accumulator
        (~2.2-2.6 sm_90 instructions per weight vs cvt's ~3.4). Each step's slice of x is scaled so that its
        largest |x| is HALF_X_MAX (32): products (|w| <= 448) summed HALF_CHUNK (4) at a time stay below
        4 * 448 * 32 = 57,344 < 65,504 whatever the activations (an earlier fixed x / 64 overflowed for
        |x| > ~2,300, which outlier features reach), and the scale goes back in fp32. Values below ~2e-6 of
        the step's largest |x| fall into fp16 subnormals: their share of the sum is below fp16's rounding.

Every variant takes GemvTiles (block_n rows, block_k features per step, split_k K ranges: gemv_tiles.py).
Reference: quant_ref.fp8_weight_only_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.gemv_tiles import GemvTiles, split_k_range, split_k_reduce

FP8_GEMV_VARIANTS = ("cvt", "bits", "dot", "half")
_TWO_POW_56 = tl.constexpr(2.0**56)  # 2^120 (the e4m3 -> fp32 exponent bias) less the 2^64 folded into x
_TWO_POW_64 = tl.constexpr(2.0**64)
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
def _fp8_gemv_cvt_kernel(
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
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
        acc += w.to(tl.float32) * x[None, :]
    _finish(tl.sum(acc, 1), rows, rmask, s_ptr, b_ptr, out_ptr, pid_k, N, HAS_BIAS, SPLIT)


@triton.jit
def _fp8_gemv_bits_kernel(
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # w_ptr is the weight as int32 words [N, K / 4] (stride_w in words): byte i of word j is weight 4j + i
    pid_k = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    js = tl.arange(0, BLOCK_K // 4)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros([BLOCK_N, BLOCK_K // 4], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        jj = k0 // 4 + js
        jmask = jj * 4 < k_hi
        if EVEN:
            words = tl.load(w_rows + jj[None, :])
        else:
            words = tl.load(w_rows + jj[None, :], mask=rmask[:, None] & jmask[None, :], other=0)
        for i in tl.static_range(4):
            if EVEN:
                x = tl.load(x_ptr + jj * 4 + i).to(tl.float32) * _TWO_POW_64
            else:
                x = tl.load(x_ptr + jj * 4 + i, mask=jmask, other=0.0).to(tl.float32) * _TWO_POW_64
            # byte i (bits 8i..8i+7: sign, 4 exponent, 3 mantissa bits) -> fp32 bits 31 | 26..23 | 22..20
            if i == 3:
                sign = words & -0x80000000
                mag = (words >> 4) & 0x07F00000
            else:
                sign = (words << (24 - 8 * i)) & -0x80000000
                mag = (words << (20 - 8 * i)) & 0x07F00000
            w = (sign | mag).to(tl.float32, bitcast=True)
            acc += w * x[None, :]
    _finish(tl.sum(acc, 1) * _TWO_POW_56, rows, rmask, s_ptr, b_ptr, out_ptr, pid_k, N, HAS_BIAS, SPLIT)


@triton.jit
def _fp8_gemv_dot_kernel(
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ks = tl.arange(0, BLOCK_K)
    first = tl.arange(0, 16)[:, None] == 0  # x is row 0 of a 16-row tile, the smallest tl.dot takes
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + ks
        kmask = kk < k_hi
        if EVEN:
            x = tl.load(x_ptr + kk).to(tl.float16)  # convert the row, then broadcast
            w = tl.load(w_rows + kk[None, :]).to(tl.float16)
        else:
            x = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float16)
            w = tl.load(w_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float16)
        a = tl.where(first, x[None, :], 0.0).to(tl.float16)
        acc += tl.dot(a, tl.trans(w))
    y = tl.sum(tl.where(first, acc, 0.0), 0)
    _finish(y, rows, rmask, s_ptr, b_ptr, out_ptr, pid_k, N, HAS_BIAS, SPLIT)


@triton.jit
def _fp8_gemv_half_kernel(
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros([BLOCK_N, BLOCK_K // HALF_CHUNK], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + ks
        kmask = kk < k_hi
        if EVEN:
            x = tl.load(x_ptr + kk)
            w = tl.load(w_rows + kk[None, :])
        else:
            x = tl.load(x_ptr + kk, mask=kmask, other=0.0)
            w = tl.load(w_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        # x scaled per step so that max |x| is HALF_X_MAX: fp16 products cannot overflow (module docstring)
        x = x.to(tl.float32)
        step_scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-30) * (1.0 / HALF_X_MAX)
        xh = (x * (1.0 / step_scale)).to(tl.float16)
        p = tl.reshape(w.to(tl.float16) * xh[None, :], [BLOCK_N, BLOCK_K // HALF_CHUNK, HALF_CHUNK])
        acc += tl.sum(p, 2, dtype=tl.float16).to(tl.float32) * step_scale
    _finish(tl.sum(acc, 1), rows, rmask, s_ptr, b_ptr, out_ptr, pid_k, N, HAS_BIAS, SPLIT)


_KERNELS = {
    "cvt": _fp8_gemv_cvt_kernel,
    "bits": _fp8_gemv_bits_kernel,
    "dot": _fp8_gemv_dot_kernel,
    "half": _fp8_gemv_half_kernel,
}


def default_fp8_tiles(variant: str, n: int, k: int) -> GemvTiles:
    """Best guesses until the H200 sweep (tools/bench_quant_gemv.py) picks them per variant. In sm_90 code the
    first kernel's 4 x 1,024 tile on 8 warps spent ~4.7 instructions per weight in its loop: x, loaded 4 values
    a thread, went through shared memory (and a barrier) every step to reach the weight tile's layout of 16 a
    thread replicated over the warps. 4 x 2,048 on 4 warps puts the warps along K, so x's own load layout is
    already the weight tile's: ~3.4 per weight, 64 weights a thread a step, 106 registers."""
    if variant == "dot":  # 64 rows: N / 64 programs, split-K where that leaves < 2 per SM (~2.7 / weight)
        return GemvTiles(64, 128, split_k=1 if n >= 16384 else 4, num_warps=4, num_stages=4)
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
    if variant not in _KERNELS:
        raise ValueError(f"unknown fp8 GEMV variant {variant!r} ({', '.join(FP8_GEMV_VARIANTS)})")
    x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if variant == "bits" and (k % 4 or weight.stride(0) % 4 or weight.data_ptr() % 4):
        variant = "cvt"  # int32 words need whole words per row
    tiles = tiles or default_fp8_tiles(variant, n, k)
    scale = weight_scale.float().contiguous()
    w, stride_w = weight, weight.stride(0)
    if variant == "bits":
        w, stride_w = weight.view(torch.int32), weight.stride(0) // 4
    per_split, splits = split_k_range(k, tiles)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    out = torch.empty((splits, 1, n), dtype=torch.float32, device=x.device) if splits > 1 else y
    _KERNELS[variant][(triton.cdiv(n, tiles.block_n), splits)](
        x,
        w,
        scale,
        bias if bias is not None else x,
        out,
        n,
        k,
        stride_w,
        per_split,
        HAS_BIAS=bias is not None,
        SPLIT=splits > 1,
        EVEN=n % tiles.block_n == 0 and per_split * splits == k,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    if splits > 1:
        split_k_reduce(out, y.view(1, n), scale, bias)
    return y
