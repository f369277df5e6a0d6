"""Batch-1 FP8-weight GEMV in Triton: y[1, N] = x[1, K] @ (W_fp8[N, K] * scale[N])^T (+ bias), weight-only (the
16-bit row is not quantized), fp32 sums, the per-channel scale applied once per output. Variants of the weight
decode and product, selectable for A/B on the device (tools/bench_quant_gemv.py, MESHSERVE_FP8_GEMV):

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
        Its sm_90 loop requests a step's weights only after x arrived and its cross-warp max was taken: every
        step pays x's L2 round trip and three barriers before its weight loads (71-86% of copy bandwidth).
  local half with x scaled per LOCAL_GROUP (8) features, each group in one thread: no cross-warp max (A/B only:
        level with half on the H200, the same load order).
  words (the default) the weight as uint32 words and x as uint64 quads in one register layout, the loop rotated
        so that a trip's words and x are requested at the top of the trip before (the first trip's before the PDL
        wait): the weight stream never waits on x. Per word, two cvt.rn.f16x2.e4m3x2, one HMUL2 and one HFMA2
        against x scaled per word (largest |x| 32: four products < 65,504), the two fp16 lanes summed in fp32
        (_WORD_DOT_ASM; the interpreter runs the same fp16 lanes as tensors). Tiles by shape (words_tiles): H200
        2026-12-04, an 8B layer's four projections 60.2 us against half's 63.7 (78-97% of copy), and W1 8B fp8 with
        PDL in one-row steps 354-362 tok/s against 338-339 (half, no PDL).

Two more (bits: the e4m3 bits moved into an fp32 with integer ops; dot: tensor cores on a 16-row tile) lost on
the H200 and were removed (QUANTIZATION.md). Every variant takes GemvTiles (block_n rows, block_k features per
step, split_k K ranges: gemv_tiles.py); _fp8_gemv_kernel serves cvt / half / local (HALF, LOCAL constexprs),
_fp8_gemv_words_kernel the words variant. Reference: quant_ref.fp8_weight_only_ref.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from meshserve.kernels import pdl as pdl_mod
from meshserve.kernels.gemv_tiles import GemvTiles, split_k_range, split_k_reduce
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait
from meshserve.kernels.triton_e4m3_words import e4m3x4_to_f16
from meshserve.kernels.triton_half2 import pack_half2

FP8_GEMV_VARIANTS = ("cvt", "half", "local", "words")
HALF_CHUNK = tl.constexpr(4)  # fp16 products summed in fp16 before an fp32 add (the half variant)
HALF_X_MAX = tl.constexpr(32.0)  # the half variant scales x so its largest |x| is this: 4 * 448 * 32 < 65,504
LOCAL_GROUP = tl.constexpr(8)  # the local variant's features per x scale (whole in one thread's registers)


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
def _half_products(w, x, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K // HALF_CHUNK] fp32: the half variant's step, x scaled so that the step's largest |x|
    is HALF_X_MAX (a max over the whole step: a cross-warp reduction), fp16 products summed HALF_CHUNK at a time,
    the scale undone in fp32."""
    step_scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-30) * (1.0 / HALF_X_MAX)
    xh = (x * (1.0 / step_scale)).to(tl.float16)
    p = tl.reshape(w.to(tl.float16) * xh[None, :], [BLOCK_N, BLOCK_K // HALF_CHUNK, HALF_CHUNK])
    return tl.sum(p, 2, dtype=tl.float16).to(tl.float32) * step_scale


@triton.jit
def _local_products(w, x, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K // LOCAL_GROUP] fp32: the local variant's step, each group of LOCAL_GROUP consecutive
    features of x scaled by its own largest |x| (a thread holds whole groups: no cross-thread reduction), fp16
    products summed HALF_CHUNK at a time, chunk sums of a group added in fp32 times the group's scale."""
    xg = tl.reshape(x, [BLOCK_K // LOCAL_GROUP, LOCAL_GROUP])
    amax = tl.maximum(tl.max(tl.abs(xg), 1), 1e-30)
    xh = tl.reshape(xg * ((1.0 / amax) * HALF_X_MAX)[:, None], [BLOCK_K]).to(tl.float16)
    p = tl.reshape(w.to(tl.float16) * xh[None, :], [BLOCK_N, BLOCK_K // HALF_CHUNK, HALF_CHUNK])
    chunks = tl.sum(p, 2, dtype=tl.float16).to(tl.float32)
    groups = tl.sum(tl.reshape(chunks, [BLOCK_N, BLOCK_K // LOCAL_GROUP, LOCAL_GROUP // HALF_CHUNK]), 2)
    return groups * (amax * (1.0 / HALF_X_MAX))[None, :]


@triton.jit
def _w_tile(w_rows, kk, k_hi, rmask, EVEN: tl.constexpr):
    """The fp8 weights [BLOCK_N, BLOCK_K] of the features kk (EVEN: no masks)."""
    if EVEN:
        return tl.load(w_rows + kk[None, :])
    else:
        return tl.load(w_rows + kk[None, :], mask=rmask[:, None] & (kk < k_hi)[None, :], other=0.0)


@triton.jit
def _x_slice(x_ptr, kk, k_hi, EVEN: tl.constexpr):
    """x [BLOCK_K] of the features kk in fp32 (EVEN: no mask)."""
    if EVEN:
        return tl.load(x_ptr + kk).to(tl.float32)
    else:
        return tl.load(x_ptr + kk, mask=kk < k_hi, other=0.0).to(tl.float32)


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
    LOCAL: tl.constexpr = False,
    USE_GDC: tl.constexpr = False,
):
    """HALF: the half variant's fp16 products (LOCAL: the local variant's group scales), else cvt's fp32 ones
    (module docstring)."""
    pid_k = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    if HALF:
        if LOCAL:
            acc = tl.zeros([BLOCK_N, BLOCK_K // LOCAL_GROUP], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_K // HALF_CHUNK], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    gdc_wait(USE_GDC)  # x is the previous kernel's output
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + ks
        w_step = _w_tile(w_rows, kk, k_hi, rmask, EVEN)
        x_step = _x_slice(x_ptr, kk, k_hi, EVEN)
        if HALF:
            if LOCAL:
                acc += _local_products(w_step, x_step, BLOCK_N, BLOCK_K)
            else:
                acc += _half_products(w_step, x_step, BLOCK_N, BLOCK_K)
        else:
            acc += w_step.to(tl.float32) * x_step[None, :]
    gdc_trigger_late(USE_GDC)
    _finish(tl.sum(acc, 1), rows, rmask, s_ptr, b_ptr, out_ptr, pid_k, N, HAS_BIAS, SPLIT)


# one weight word (four e4m3: bytes 0-3 are features 4j..4j+3) times the word's x as two fp16 pairs, (x0, x1) and
# (x2, x3): cvt.rn.f16x2.e4m3x2 widens each 16-bit half of the word, one HMUL2 and one HFMA2 sum the four
# products in two fp16 lanes, whose sum is taken in fp32
_WORD_DOT_ASM = tl.constexpr("""{
.reg .b16 lo, hi;
.reg .b32 a, b, p;
.reg .f16 pl, ph;
.reg .f32 fl, fh;
mov.b32 {lo, hi}, $1;
cvt.rn.f16x2.e4m3x2 a, lo;
cvt.rn.f16x2.e4m3x2 b, hi;
mul.rn.f16x2 p, a, $2;
fma.rn.f16x2 p, b, $3, p;
mov.b32 {pl, ph}, p;
cvt.f32.f16 fl, pl;
cvt.f32.f16 fh, ph;
add.f32 $0, fl, fh;
}""")


@triton.jit
def _half_of(pair, HIGH: tl.constexpr):
    """The fp16 in the low (or high) 16 bits of the uint32 pair, as fp32."""
    bits = (pair >> 16) if HIGH else (pair & 0xFFFF)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _x_quads(x_ptr, jj, j_hi, EVEN: tl.constexpr, X_BF16: tl.constexpr):
    """x of the weight words jj [W] (x_ptr viewed as uint64: four 16-bit features each) as four fp32 [W]
    tensors, features 4j..4j+3."""
    if EVEN:
        q = tl.load(x_ptr + jj)
    else:
        q = tl.load(x_ptr + jj, mask=jj < j_hi, other=0)
    lo = (q & 0xFFFFFFFF).to(tl.uint32)
    hi = (q >> 32).to(tl.uint32)
    if X_BF16:  # a bf16 is the top half of its fp32
        f0 = (lo << 16).to(tl.float32, bitcast=True)
        f1 = (lo & 0xFFFF0000).to(tl.float32, bitcast=True)
        f2 = (hi << 16).to(tl.float32, bitcast=True)
        f3 = (hi & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        f0 = _half_of(lo, False)
        f1 = _half_of(lo, True)
        f2 = _half_of(hi, False)
        f3 = _half_of(hi, True)
    return f0, f1, f2, f3


@triton.jit
def _w_words(w_rows, jj, j_hi, rmask, EVEN: tl.constexpr):
    """The weight words [BLOCK_N, W] (uint32, four e4m3 each) of the words jj [W] (EVEN: no masks)."""
    jj = jj[None, :]
    if EVEN:
        return tl.load(w_rows + jj)
    else:
        return tl.load(w_rows + jj, mask=rmask[:, None] & (jj < j_hi), other=0)


@triton.jit
def _words_products(w, f0, f1, f2, f3, ASM: tl.constexpr):
    """[BLOCK_N, W] fp32: each weight word's four products with x, x scaled so that the word's largest |x| is
    HALF_X_MAX (four products of |w| <= 448: < 65,504 in fp16 whatever x holds), the scale undone in fp32."""
    amax = tl.maximum(tl.maximum(tl.maximum(tl.abs(f0), tl.abs(f1)), tl.maximum(tl.abs(f2), tl.abs(f3))), 1e-30)
    inv = (1.0 / amax) * HALF_X_MAX
    if ASM:  # x 1-D, broadcast into the weight words' layout (the small tensor moves, not the weights)
        xa = pack_half2(f0 * inv, f1 * inv, ASM)[None, :] + w * 0
        xb = pack_half2(f2 * inv, f3 * inv, ASM)[None, :] + w * 0
        dot = tl.inline_asm_elementwise(_WORD_DOT_ASM, "=f,r,r,r", [w, xa, xb], dtype=tl.float32, is_pure=True, pack=1)
    else:  # the same fp16 lanes with tensors (the interpreter runs no inline PTX): (h0 x0 + h2 x2), (h1 x1 + h3 x3)
        h0, h1, h2, h3 = e4m3x4_to_f16(w, ASM)
        lo = h0 * (f0 * inv).to(tl.float16)[None, :] + h2 * (f2 * inv).to(tl.float16)[None, :]
        hi = h1 * (f1 * inv).to(tl.float16)[None, :] + h3 * (f3 * inv).to(tl.float16)[None, :]
        dot = lo.to(tl.float32) + hi.to(tl.float32)
    return dot * (amax * (1.0 / HALF_X_MAX))[None, :]


@triton.jit
def _fp8_gemv_words_kernel(
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
    ASM: tl.constexpr,
    X_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    """The words variant: w_ptr the weight as uint32 words [N, K / 4] (stride_w in words), x_ptr the input row
    as uint64 (four features each). Each trip's words and x are requested at the end of the trip before, the
    first trip's words before the PDL wait: the weight stream never waits on x or its scales (32-bit words
    carried from one trip to the next; an fp8 tile carried so is unpacked into a register a byte)."""
    BLOCK_W: tl.constexpr = BLOCK_K // 4
    pid_k = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    js = tl.arange(0, BLOCK_W)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    j_lo = pid_k * (k_per_split // 4)
    j_hi = tl.minimum(K // 4, j_lo + k_per_split // 4)
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    w = _w_words(w_rows, j_lo + js, j_hi, rmask, EVEN)  # no kernel writes weights: before the wait
    gdc_wait(USE_GDC)  # x is the previous kernel's output
    f0, f1, f2, f3 = _x_quads(x_ptr, j_lo + js, j_hi, EVEN, X_BF16)
    for j0 in range(j_lo, j_hi, BLOCK_W):
        w_step, g0, g1, g2, g3 = w, f0, f1, f2, f3
        # EVEN: the last trip re-reads its own tile (in L1 / L2 by now) rather than a masked load past j_hi
        jn = tl.minimum(j0 + BLOCK_W, j_hi - BLOCK_W) + js if EVEN else j0 + BLOCK_W + js
        w = _w_words(w_rows, jn, j_hi, rmask, EVEN)
        f0, f1, f2, f3 = _x_quads(x_ptr, jn, j_hi, EVEN, X_BF16)
        acc += _words_products(w_step, g0, g1, g2, g3, ASM)
    gdc_trigger_late(USE_GDC)
    _finish(tl.sum(acc, 1), rows, rmask, s_ptr, b_ptr, out_ptr, pid_k, N, HAS_BIAS, SPLIT)


def default_fp8_tiles(variant: str, n: int, k: int) -> GemvTiles:
    """Best guesses until the H200 sweep (tools/bench_quant_gemv.py) picks them per variant. In sm_90 code the
    first kernel's 4 x 1,024 tile on 8 warps spent ~4.7 instructions per weight in its loop: x, loaded 4 values
    a thread, went through shared memory (and a barrier) every step to reach the weight tile's layout of 16 a
    thread replicated over the warps. 4 x 2,048 on 4 warps puts the warps along K, so x's own load layout is
    already the weight tile's: ~3.4 per weight, 64 weights a thread a step, 106 registers."""
    if variant == "words":
        return words_tiles(n, k)
    return GemvTiles(4, 2048, num_warps=4, num_stages=3)


def words_tiles(n: int, k: int) -> GemvTiles:
    """The words variant's tile by shape, from the H200 sweep of 2026-12-04 (tools/bench_quant_gemv.py, Llama-3.1-8B's
    projections; us, % of copy bandwidth): long rows (down, K 14,336) 4 x 1,024 on 2 warps (17.4, 80%); many rows
    (gate_up, N 28,672) 8 x 512 on one warp (31.9, 87%); the others (qkv, o) 16 x 1,024 on 4 warps (6.1, 97% and
    4.8, 83%). 8 x 1,024 on 2 warps for every shape: 61.3 us a layer, these 60.2; the first tile (4 x 2,048 on 4
    warps, the half variant's) 68.0, as its registers (56) left the rotated loop too few bytes in flight."""
    spec = os.environ.get("MESHSERVE_FP8_WORDS_TILE", "")  # "block_n,block_k,num_warps" for every shape (A/Bs;
    if spec:  # read at each launch: graphs capture launches once)
        try:
            block_n, block_k, num_warps = (int(v) for v in spec.split(","))
        except ValueError:
            raise ValueError(f"MESHSERVE_FP8_WORDS_TILE={spec!r}: expected block_n,block_k,num_warps") from None
        return GemvTiles(block_n, block_k, num_warps=num_warps, num_stages=3)
    if k >= 8192:
        return GemvTiles(4, 1024, num_warps=2, num_stages=3)
    if n >= 16384:
        return GemvTiles(8, 512, num_warps=1, num_stages=3)
    return GemvTiles(16, 1024, num_warps=4, num_stages=3)


def words_fit(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the words variant can view this weight as uint32 words and x as uint64 quads: K a multiple of 4,
    rows of whole words, 4- and 8-byte aligned bases."""
    k = weight.shape[1]
    return (k % 4 == 0 and weight.stride(1) == 1 and weight.stride(0) % 4 == 0 and weight.data_ptr() % 4 == 0
            and x.is_contiguous() and x.element_size() == 2 and x.data_ptr() % 8 == 0)


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    variant: str = "cvt",
    tiles: GemvTiles | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] float8_e4m3fn, weight_scale [N] -> [..., N] in x.dtype.
    variant "words" on a weight or x it cannot view as words (words_fit) runs "local". pdl: the PDL launch
    (None: the process switch, kernels/pdl.py)."""
    n, k = weight.shape
    if x.numel() != k:
        raise ValueError(f"fp8_gemv takes one row of {k} features, got shape {tuple(x.shape)}")
    if variant not in FP8_GEMV_VARIANTS:
        raise ValueError(f"unknown fp8 GEMV variant {variant!r} ({', '.join(FP8_GEMV_VARIANTS)})")
    x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if variant == "words" and not words_fit(x, weight):
        variant = "local"
    tiles = tiles or default_fp8_tiles(variant, n, k)
    scale = weight_scale.float().contiguous()
    per_split, splits = split_k_range(k, tiles)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    out = torch.empty((splits, 1, n), dtype=torch.float32, device=x.device) if splits > 1 else y
    grid = (triton.cdiv(n, tiles.block_n), splits)
    gdc = pdl_mod.gdc_kwargs(x, pdl, programs=grid[0] * grid[1], num_warps=tiles.num_warps)
    common = dict(
        HAS_BIAS=bias is not None,
        SPLIT=splits > 1,
        EVEN=n % tiles.block_n == 0 and per_split * splits == k,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        **gdc,
    )
    if variant == "words":
        _fp8_gemv_words_kernel[grid](
            x.view(torch.int64), weight.view(torch.int32), scale, bias if bias is not None else x, out, n, k,
            weight.stride(0) // 4, per_split, ASM=x.is_cuda and not pdl_mod.interpreting(),
            X_BF16=x.dtype == torch.bfloat16, **common,
        )
    else:
        _fp8_gemv_kernel[grid](
            x, weight, scale, bias if bias is not None else x, out, n, k, weight.stride(0), per_split,
            HALF=variant != "cvt", LOCAL=variant == "local", **common,
        )
    if splits > 1:
        split_k_reduce(out, y.view(1, n), scale, bias)
    return y
