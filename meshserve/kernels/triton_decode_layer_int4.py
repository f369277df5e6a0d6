"""The decode layer kernel's GEMV phases over INT4 group-wise weights (AWQ / GPTQ without act-order, and dummy
weights quantized at load: layers/quantization/int4.py), in the internal layout of kernels/quant_ref.py:
qweight [K / 8, N] int32 (nibble i of word row p is input feature 8p + i), scales and zeros [K / G, N].

The layout runs along the output features, so a program owns a block of output columns and sweeps all of K,
BLOCK_P word rows a trip ([BLOCK_P, BLOCK_C] words: 16 B of weights a thread, as the 16-bit phases stream), no
split-K and no partial sums: the block's sum over K is one reduction at its end. Each word's eight products are
taken as the half INT4 GEMV takes them (triton_int4_gemv._HALF_WORDS_ASM, one word here): nibbles (j, j + 4)
decode into one f16x2 with a LOP3 (1024 + q, or 1024 + 16q against x / 16), one HSUB2 of the packed zero gives
the exact q - z, HFMA2s against x scaled so that the word row's largest |x| is 32 (8 products of |q - z| <= 15:
< 4,000 in fp16 whatever x holds), the two fp16 lanes summed in fp32, times the group's scale and the row's x
scale. Scales and zeros are read per word (each word row's group: any group size that is a multiple of 8).
x is the layer kernel's input row as triton_decode_layer_fp8._x_of_words gives it (the norm on load, or
silu(gate) * up), 16 bytes a word row. The interpreter runs the same fp16 lanes spelled with tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl

from meshserve.kernels.triton_attention import _next_pow2
from meshserve.kernels.triton_decode_layer_fp8 import _x_of_words
from meshserve.kernels.triton_half2 import pack_half2

X_MAX = tl.constexpr(32.0)  # a word row's x is scaled so that its largest |x| is this

# one word (8 weights of one output column: input features 8p..8p+7) against x's fp16 pairs (x0, x4), (x1, x5) / 16,
# (x2, x6), (x3, x7) / 16 and the packed zero (1024 + z, 1024 + z), (1024 + 16z, 1024 + 16z): 13 instructions
# for 8 weights, then the two fp16 lanes added in fp32
_WORD_ASM = tl.constexpr("""{
.reg .b32 t, u, a;
.reg .f16 l, h;
.reg .f32 fl, fh;
lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 t, t, $2;
mul.rn.f16x2 a, t, $4;
lop3.b32 t, $1, 0x00F000F0, 0x64006400, 0xEA;
sub.f16x2 t, t, $3;
fma.rn.f16x2 a, t, $5, a;
shr.b32 u, $1, 8;
lop3.b32 t, u, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 t, t, $2;
fma.rn.f16x2 a, t, $6, a;
lop3.b32 t, u, 0x00F000F0, 0x64006400, 0xEA;
sub.f16x2 t, t, $3;
fma.rn.f16x2 a, t, $7, a;
mov.b32 {l, h}, a;
cvt.f32.f16 fl, l;
cvt.f32.f16 fh, h;
add.f32 $0, fl, fh;
}""")


@triton.jit
def _f16(v):
    return v.to(tl.float16).to(tl.float32)


@triton.jit
def _word_dots(w, z, xs, inv, ASM: tl.constexpr):
    """[BLOCK_P, BLOCK_C] fp32: each word's sum of (q_i - z) * x_i * inv in fp16 lanes (the module docstring);
    xs the word rows' eight x values (fp32 [BLOCK_P] each), inv [BLOCK_P] their scale, z the words' zeros."""
    x0, x1, x2, x3, x4, x5, x6, x7 = xs
    if ASM:  # x broadcast into the words' layout (the small tensor moves, not the weights)
        inv16 = inv * 0.0625  # the odd nibble pairs decode as 16 (q - z)
        xa = pack_half2(x0 * inv, x4 * inv, ASM)[:, None] + w * 0
        xb = pack_half2(x1 * inv16, x5 * inv16, ASM)[:, None] + w * 0
        xc = pack_half2(x2 * inv, x6 * inv, ASM)[:, None] + w * 0
        xd = pack_half2(x3 * inv16, x7 * inv16, ASM)[:, None] + w * 0
        zl = z + 1024.0
        zh = z * 16.0 + 1024.0
        return tl.inline_asm_elementwise(
            _WORD_ASM, "=f,r,r,r,r,r,r,r",
            [w, pack_half2(zl, zl, ASM), pack_half2(zh, zh, ASM), xa, xb, xc, xd],
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
            lo = _f16(lo + _f16((q_lo - z) * f) * _f16(x_lo * inv / f)[:, None])
            hi = _f16(hi + _f16((q_hi - z) * f) * _f16(x_hi * inv / f)[:, None])
        return lo + hi


@triton.jit
def int4_first_tile(qw_ptr, N, K, blk, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The first trip's words [BLOCK_P, BLOCK_C] of column block blk (weights: no phase writes them, so they load
    before the phase's barrier)."""
    ps = tl.arange(0, BLOCK_P)
    cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    return tl.load(qw_ptr + ps[:, None] * N + cols[None, :], mask=(ps < K // 8)[:, None] & (cols < N)[None, :],
                   other=0)


@triton.jit
def int4_cols(x_ptr, nw_ptr, inv_rms, qw_ptr, s_ptr, z_ptr, cols, cmask, N, K, w_first, GROUP: tl.constexpr,
              GATED: tl.constexpr, NORMED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
              HAS_FIRST: tl.constexpr, ASM: tl.constexpr):
    """fp32 [BLOCK_C]: (W x)[cols] for the INT4 weight (qweight, scales, zeros as the module docstring says), x
    the layer kernel's input row of K features; w_first the first trip's words when HAS_FIRST (int4_first_tile),
    the next trip's words and x requested before this trip's products."""
    KP = K // 8
    ps = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    if HAS_FIRST:
        w = w_first
    else:
        w = tl.load(qw_ptr + ps[:, None] * N + cols[None, :], mask=(ps < KP)[:, None] & cmask[None, :], other=0)
    x0, x1, x2, x3 = _x_of_words(x_ptr, nw_ptr, inv_rms, 2 * ps, K, GATED, NORMED)
    x4, x5, x6, x7 = _x_of_words(x_ptr, nw_ptr, inv_rms, 2 * ps + 1, K, GATED, NORMED)
    for p0 in range(0, KP, BLOCK_P):
        w_step, xs = w, (x0, x1, x2, x3, x4, x5, x6, x7)
        p = p0 + ps
        mask = (p < KP)[:, None] & cmask[None, :]
        g_off = ((p * 8) // GROUP)[:, None] * N + cols[None, :]  # each word row's group
        s = tl.load(s_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        pn = p + BLOCK_P  # past K on the last trip: masked off, nothing read
        w = tl.load(qw_ptr + pn[:, None] * N + cols[None, :], mask=(pn < KP)[:, None] & cmask[None, :], other=0)
        x0, x1, x2, x3 = _x_of_words(x_ptr, nw_ptr, inv_rms, 2 * pn, K, GATED, NORMED)
        x4, x5, x6, x7 = _x_of_words(x_ptr, nw_ptr, inv_rms, 2 * pn + 1, K, GATED, NORMED)
        amax = tl.maximum(tl.maximum(tl.maximum(tl.abs(xs[0]), tl.abs(xs[1])), tl.maximum(tl.abs(xs[2]), tl.abs(xs[3]))),
                          tl.maximum(tl.maximum(tl.abs(xs[4]), tl.abs(xs[5])), tl.maximum(tl.abs(xs[6]), tl.abs(xs[7]))))
        amax = tl.maximum(amax, 1e-30)
        dots = _word_dots(w_step, z, xs, X_MAX / amax, ASM)
        acc += dots * s * (amax * (1.0 / X_MAX))[:, None]
    return tl.sum(acc, 0)


def int4_phase_tile(n: int, k: int, programs: int, threads: int, values: int = 32) -> tuple[int, int, int]:
    """(output columns a block, word rows a trip, 1 if the first trip preloads) of an INT4 GEMV phase over n
    output columns of k input features: the widest block (at most 64 columns) that leaves the busiest program
    within 10% of the fewest columns any width gives (Llama-3.1-8B's qkv 6,144 over 132 programs: 16, three
    blocks each; o / down 4,096: 32, one each), and `values` 16-bit values' bytes a thread a trip (a word a
    thread holds 8 weights: values / 2 words)."""
    def busiest(c: int) -> int:
        return -(-(-(-n // c)) // programs) * c

    widths = (64, 32, 16, 8)
    fewest = min(busiest(c) for c in widths)
    cols = next(c for c in widths if busiest(c) <= 1.1 * fewest)
    rows = min(_next_pow2(k // 8), max(1, (values // 2) * threads // cols))
    return cols, rows, 1
