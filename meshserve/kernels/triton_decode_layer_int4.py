"""The decode layer kernel's GEMV phases over INT4 group-wise weights (AWQ / GPTQ without act-order, and dummy
weights quantized at load: layers/quantization/int4.py), in the internal layout of kernels/quant_ref.py:
qweight [K / 8, N] int32 (nibble i of word row p is input feature 8p + i), scales and zeros [K / G, N].

The layout runs along the output features, so a program owns a block of output columns and sweeps all of K, whole
groups a trip ([groups, GROUP / 8, columns] words: the bytes a thread the 16-bit phases stream a trip), no
split-K and no partial sums: the block's sum over K is one reduction at its end. Each word's eight products are
taken as the half INT4 GEMV takes them (triton_int4_gemv.half_words_ptx, one word): nibbles (j, j + 4)
decode into one f16x2 with a LOP3 (1024 + q, or 1024 + 16q against x / 16), one HSUB2 of the packed zero gives
the exact q - z, HFMA2s against x, the two fp16 lanes summed in fp32. A group's scale and zero load once for its
word rows, x is scaled per group (its largest |x| 32: 8 products of |q - z| <= 15 stay < 4,000 in fp16), and
each word's lane sum goes into the accumulator times its group's scale and x scale (one factor a group). Group
sizes of 8 times a power of two that divide K (int4_group_fits). x is the layer kernel's input row as
triton_decode_layer_fp8._x_of_words gives it (the norm on load, or silu(gate) * up), 16 bytes a word row.
The interpreter runs the same fp16 lanes spelled with tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl

from meshserve.kernels.triton_attention import _next_pow2
from meshserve.kernels.triton_decode_layer_fp8 import _x_of_words
from meshserve.kernels.triton_half2 import pack_half2
from meshserve.kernels.triton_int4_gemv import half_words_ptx

X_MAX = tl.constexpr(32.0)  # a group's x is scaled so that its largest |x| is this

# one word (8 weights of one output column: input features 8p..8p+7) against x's fp16 pairs and the packed zeros
# (1024 + z, 1024 + z), (1024 + 16z, 1024 + 16z): the half GEMV's PTX for one word
_WORD_ASM = tl.constexpr(half_words_ptx(("$1",), "$2", "$3", ("$4", "$5", "$6", "$7")))


@triton.jit
def _f16(v):
    return v.to(tl.float16).to(tl.float32)


@triton.jit
def _word_dots(w, z, xs, ASM: tl.constexpr):
    """[BLOCK_G, GP, BLOCK_C] fp32: each word's sum of (q_i - z) * x_i in fp16 lanes (the module docstring); xs
    the word rows' eight x values, already scaled (fp32 [BLOCK_G, GP] each), z the groups' zeros [BLOCK_G, 1,
    BLOCK_C]."""
    x0, x1, x2, x3, x4, x5, x6, x7 = xs
    if ASM:  # x broadcast into the words' layout (the small tensor moves, not the weights)
        xa = pack_half2(x0, x4, ASM)[:, :, None] + w * 0
        xb = pack_half2(x1 * 0.0625, x5 * 0.0625, ASM)[:, :, None] + w * 0  # odd pairs decode as 16 (q - z)
        xc = pack_half2(x2, x6, ASM)[:, :, None] + w * 0
        xd = pack_half2(x3 * 0.0625, x7 * 0.0625, ASM)[:, :, None] + w * 0
        zl = z + 1024.0
        zh = z * 16.0 + 1024.0
        return tl.inline_asm_elementwise(
            _WORD_ASM, "=f,r,r,r,r,r,r,r",
            [w, pack_half2(zl, zl, ASM) + w * 0, pack_half2(zh, zh, ASM) + w * 0, xa, xb, xc, xd],
            dtype=tl.float32, is_pure=True, pack=1,
        )
    else:  # the same fp16 lanes: the low one nibbles 0..3 against x0..x3, the high one 4..7 against x4..x7
        lo = tl.zeros(w.shape, dtype=tl.float32)
        hi = tl.zeros(w.shape, dtype=tl.float32)
        for j in tl.static_range(4):
            f: tl.constexpr = 16.0 if j % 2 else 1.0
            q_lo = ((w >> (4 * j)) & 15).to(tl.float32)
            q_hi = ((w >> (4 * j + 16)) & 15).to(tl.float32)
            x_lo = (x0, x1, x2, x3)[j]
            x_hi = (x4, x5, x6, x7)[j]
            lo = _f16(lo + _f16((q_lo - z) * f) * _f16(x_lo / f)[:, :, None])
            hi = _f16(hi + _f16((q_hi - z) * f) * _f16(x_hi / f)[:, :, None])
        return lo + hi


@triton.jit
def _words_tile(qw_ptr, g, cols, cmask, N, G, GP: tl.constexpr):
    """The words [BLOCK_G, GP, BLOCK_C] of the groups g (their GP word rows each) and the columns cols."""
    rows = g[:, None] * GP + tl.arange(0, GP)[None, :]
    return tl.load(qw_ptr + rows[:, :, None] * N + cols[None, None, :],
                   mask=(g < G)[:, None, None] & cmask[None, None, :], other=0)


@triton.jit
def _group_x(x_ptr, nw_ptr, inv_rms, g, K, GP: tl.constexpr, GATED: tl.constexpr, NORMED: tl.constexpr):
    """x at the groups g's word rows: eight fp32 [BLOCK_G, GP], features 8p + i of word row p."""
    p = g[:, None] * GP + tl.arange(0, GP)[None, :]
    x0, x1, x2, x3 = _x_of_words(x_ptr, nw_ptr, inv_rms, 2 * p, K, GATED, NORMED)
    x4, x5, x6, x7 = _x_of_words(x_ptr, nw_ptr, inv_rms, 2 * p + 1, K, GATED, NORMED)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def int4_first_tile(qw_ptr, N, K, blk, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, GROUP: tl.constexpr):
    """The first trip's words of column block blk (weights: no phase writes them, so they load before the
    phase's barrier)."""
    cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    return _words_tile(qw_ptr, tl.arange(0, BLOCK_G), cols, cols < N, N, K // GROUP, GROUP // 8)


@triton.jit
def int4_cols(x_ptr, nw_ptr, inv_rms, qw_ptr, s_ptr, z_ptr, cols, cmask, N, K, w_first, GROUP: tl.constexpr,
              GATED: tl.constexpr, NORMED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
              HAS_FIRST: tl.constexpr, ASM: tl.constexpr):
    """fp32 [BLOCK_C]: (W x)[cols] for the INT4 weight (qweight, scales, zeros as the module docstring says), x
    the layer kernel's input row of K features, BLOCK_G whole groups a trip ([BLOCK_G, GROUP / 8, BLOCK_C] words:
    a group's scale and zero loaded once for its word rows, x scaled per group); w_first the first trip's words
    when HAS_FIRST (int4_first_tile); the next trip's words and x requested before this trip's products."""
    GP: tl.constexpr = GROUP // 8  # word rows a group
    G = K // GROUP
    gs = tl.arange(0, BLOCK_G)
    acc = tl.zeros([BLOCK_G, GP, BLOCK_C], dtype=tl.float32)
    if HAS_FIRST:
        w = w_first
    else:
        w = _words_tile(qw_ptr, gs, cols, cmask, N, G, GP)
    x0, x1, x2, x3, x4, x5, x6, x7 = _group_x(x_ptr, nw_ptr, inv_rms, gs, K, GP, GATED, NORMED)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + gs
        w_step, xs = w, (x0, x1, x2, x3, x4, x5, x6, x7)
        offs = g[:, None, None] * N + cols[None, None, :]  # [BLOCK_G, 1, BLOCK_C]: a group's scale and zero
        mask = (g < G)[:, None, None] & cmask[None, None, :]
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gn = g + BLOCK_G  # past K on the last trip: masked off, nothing read
        w = _words_tile(qw_ptr, gn, cols, cmask, N, G, GP)
        x0, x1, x2, x3, x4, x5, x6, x7 = _group_x(x_ptr, nw_ptr, inv_rms, gn, K, GP, GATED, NORMED)
        amax = tl.abs(xs[0])
        for i in tl.static_range(1, 8):
            amax = tl.maximum(amax, tl.abs(xs[i]))
        amax = tl.maximum(tl.max(amax, 1), 1e-30)  # the group's largest |x|: [BLOCK_G]
        inv = X_MAX / amax[:, None]
        scaled = (xs[0] * inv, xs[1] * inv, xs[2] * inv, xs[3] * inv, xs[4] * inv, xs[5] * inv, xs[6] * inv,
                  xs[7] * inv)
        acc += _word_dots(w_step, z, scaled, ASM) * (s * (amax * (1.0 / X_MAX))[:, None, None])
    return tl.sum(tl.sum(acc, 1), 0)


def int4_group_fits(group: int | None) -> bool:
    """Whether the phase takes INT4 groups of this size: 8 times a power of two (a group's word rows are one
    tensor dimension; a word never straddles two groups). Channel-wise INT4 (one group over all of K) fits only
    where K does."""
    return bool(group) and group % 8 == 0 and (group // 8) & (group // 8 - 1) == 0


def int4_phase_tile(n: int, k: int, group: int, programs: int, threads: int, values: int = 32) -> tuple[int, int, int]:
    """(output columns a block, groups a trip, 1: the first trip preloads) of an INT4 GEMV phase over n output
    columns of k input features in groups of `group`: the widest block (at most 64 columns) that leaves the
    busiest program within 10% of the fewest columns any width gives (Llama-3.1-8B's qkv 6,144 over 132
    programs: 16, three blocks each; o / down 4,096: 32, one each), and `values` 16-bit values' bytes a thread a
    trip (values / 2 words: 8 weights each), in whole groups."""
    def busiest(c: int) -> int:
        return -(-(-(-n // c)) // programs) * c

    widths = (64, 32, 16, 8)
    fewest = min(busiest(c) for c in widths)
    cols = next(c for c in widths if busiest(c) <= 1.1 * fewest)
    groups = min(_next_pow2(k // group), max(1, (values // 2) * threads // (cols * (group // 8))))
    return cols, groups, 1
