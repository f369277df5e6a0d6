"""The decode layer kernel's GEMV phases over INT4 group-wise weights (AWQ / GPTQ without act-order, and dummy
weights quantized at load: layers/quantization/int4.py), in the internal layout of kernels/quant_ref.py:
qweight [K / 8, N] int32 (nibble i of word row p is input feature 8p + i), scales and zeros [K / G, N].

The layout runs along the output features, so a program owns a block of output columns and sweeps all of K,
whole groups a trip (the bytes a thread the 16-bit phases stream a trip), no split-K and no partial sums: the
block's sum over K is one reduction at its end. A trip's words are two tiles [groups, GROUP / 16, columns], the
first and the second half of each group's word rows, so that a thread holds two words of one group and column
and takes their sixteen products as the half INT4 GEMV takes a pair (triton_int4_gemv.half_words_ptx): nibbles
(j, j + 4) decode into one f16x2 with a LOP3 (1024 + q, or 1024 + 16q against x / 16), one HSUB2 of the packed
zero gives the exact q - z, HFMA2s against x, the two fp16 lanes summed in fp32; the zero packed from its fp16
in the same PTX, the scale applied once a pair. x is staged once a phase (int4_stage_x): scaled per group (its
largest |x| 32: 16 products of |q - z| <= 15 stay < 8,000 in fp16) and packed into the pairs the PTX takes, in
a program's scratch the trips read in the words' own layout. Group sizes of 16 times a power of two that divide
K (int4_group_fits). The interpreter runs the same fp16 lanes spelled with tensors.

Static sm_90 (Llama-3.1-8B's layer, one program of 8 warps an SM, 32 values' bytes a thread a trip): every
phase's trip issues ~2.7 instructions a weight with no barrier and no shared memory; before the staging and the
pairs each trip redid x's norm, the group's amax and three to seven layout conversions through shared memory
(6-14 barriers): ~4 instructions a weight in qkv's trip, ~7 in gate_up's (tools/decode_layer_sass.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from meshserve.kernels.triton_attention import _next_pow2
from meshserve.kernels.triton_decode_layer_fp8 import _x_of_words
from meshserve.kernels.triton_half2 import pack_half2
from meshserve.kernels.triton_int4_gemv import half_words_ptx

X_MAX = tl.constexpr(32.0)  # a group's x is scaled so that its largest |x| is this

# two words of one column and group ($1, $2: 16 weights) against their word rows' x pairs ($4-$7, $8-$11), the
# group's zero $3 (fp16) packed into (1024 + z, 1024 + z) and (1024 + 16z, 1024 + 16z) first: the half GEMV's
# PTX for a pair
_PAIR_ASM = tl.constexpr(
    "{\n.reg .b32 zz, zl, zh, k0, k1;\nmov.b32 zz, {$3, $3};\nmov.b32 k0, 0x64006400;\nmov.b32 k1, 0x4C004C00;\n"
    "add.rn.f16x2 zl, zz, k0;\nfma.rn.f16x2 zh, zz, k1, k0;\n"
    + half_words_ptx(("$1", "$2"), "zl", "zh", tuple(f"${i}" for i in range(4, 12))) + "\n}")


@triton.jit
def _f16(v):
    return v.to(tl.float16).to(tl.float32)


@triton.jit
def _half(v, HIGH: tl.constexpr):
    """One fp16 lane of packed pairs v (uint32) as fp32: the low (bits 0-15) or the high one."""
    bits = (v >> 16) if HIGH else (v & 0xFFFF)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _pair_dots(wa, wb, z, xs_a, xs_b, ASM: tl.constexpr):
    """[BLOCK_G, GP / 2, BLOCK_C] fp32: each pair of words' sum of (q_i - z) * x_i over their 16 weights in one
    pair of fp16 lanes (the module docstring); xs_a / xs_b the word rows' x as the PTX takes them (four uint32
    [BLOCK_G, GP / 2] each: fp16 pairs (x0, x4), (x1, x5) / 16, (x2, x6), (x3, x7) / 16, scaled), z the groups'
    zeros (fp16, the words' shape)."""
    if ASM:  # x broadcast into the words' layout (the small tensor moves, not the weights)
        return tl.inline_asm_elementwise(
            _PAIR_ASM, "=f,r,r,h,r,r,r,r,r,r,r,r",
            [wa, wb, z, xs_a[0][:, :, None] + wa * 0, xs_a[1][:, :, None] + wa * 0, xs_a[2][:, :, None] + wa * 0,
             xs_a[3][:, :, None] + wa * 0, xs_b[0][:, :, None] + wa * 0, xs_b[1][:, :, None] + wa * 0,
             xs_b[2][:, :, None] + wa * 0, xs_b[3][:, :, None] + wa * 0],
            dtype=tl.float32, is_pure=True, pack=1,
        )
    else:  # the same fp16 lanes, in the PTX's order: the low one nibbles 0..3, the high one 4..7, word a then b
        zf = z.to(tl.float32)
        lo = tl.zeros(wa.shape, dtype=tl.float32)
        hi = tl.zeros(wa.shape, dtype=tl.float32)
        for i in tl.static_range(2):
            w = (wa, wb)[i]
            for j in tl.static_range(4):
                f: tl.constexpr = 16.0 if j % 2 else 1.0
                q_lo = ((w >> (4 * j)) & 15).to(tl.float32)
                q_hi = ((w >> (4 * j + 16)) & 15).to(tl.float32)
                pair = (xs_a, xs_b)[i][j]  # (x_j, x_j+4), already over f in fp16
                lo = _f16(lo + _f16((q_lo - zf) * f) * _half(pair, False)[:, :, None])
                hi = _f16(hi + _f16((q_hi - zf) * f) * _half(pair, True)[:, :, None])
        return lo + hi


@triton.jit
def _words_tile(qw_ptr, g, half, cols, cmask, N, G, HP: tl.constexpr):
    """The words [BLOCK_G, HP, BLOCK_C] of the groups g (their HP = GROUP / 16 word rows of half 0 or 1 each) and
    the columns cols."""
    rows = g[:, None] * (2 * HP) + half * HP + tl.arange(0, HP)[None, :]
    return tl.load(qw_ptr + rows[:, :, None] * N + cols[None, None, :],
                   mask=(g < G)[:, None, None] & cmask[None, None, :], other=0)


@triton.jit
def _words_pair(qw_ptr, g, cols, cmask, N, G, HP: tl.constexpr):
    """A trip's words: the groups g's first and second halves of word rows (_words_tile)."""
    return _words_tile(qw_ptr, g, 0, cols, cmask, N, G, HP), _words_tile(qw_ptr, g, 1, cols, cmask, N, G, HP)


@triton.jit
def _group_scales(s_ptr, z_ptr, g, cols, cmask, N, G, HP: tl.constexpr):
    """The scales (fp32) and zeros (fp16) of the groups g at the columns cols, loaded in the words' own layout:
    tiles of the words' shape [BLOCK_G, HP, BLOCK_C] whose word rows all point at their group's row, four columns
    a thread (as the words' 16 bytes). Loaded as [BLOCK_G, 1, BLOCK_C] they took a layout of their own and reached
    the words' through shared memory on every trip (sm_90: three conversions, 6 barriers)."""
    c4 = tl.max_contiguous(cols, 4)
    offs = g[:, None, None] * N + (tl.arange(0, HP) * 0)[None, :, None] + c4[None, None, :]
    mask = (g < G)[:, None, None] & (tl.arange(0, HP) >= 0)[None, :, None] & cmask[None, None, :]
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float16)
    return s, z


@triton.jit
def _group_x(x_ptr, nw_ptr, inv_rms, g, K, GP: tl.constexpr, GATED: tl.constexpr, NORMED: tl.constexpr):
    """x at the groups g's word rows: eight fp32 [BLOCK_G, GP], features 8p + i of word row p."""
    p = g[:, None] * GP + tl.arange(0, GP)[None, :]
    x0, x1, x2, x3 = _x_of_words(x_ptr, nw_ptr, inv_rms, 2 * p, K, GATED, NORMED)
    x4, x5, x6, x7 = _x_of_words(x_ptr, nw_ptr, inv_rms, 2 * p + 1, K, GATED, NORMED)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def int4_stage_x(x_ptr, nw_ptr, inv_rms, xs_ptr, K, GROUP: tl.constexpr, GATED: tl.constexpr,
                 NORMED: tl.constexpr, BLOCK_G: tl.constexpr, ASM: tl.constexpr):
    """Once a phase, before its column blocks: the input row x (the norm on load, or silu(gate) * up) as the
    pair PTX takes it, to this program's scratch xs_ptr (uint32, int4_scratch_words): word row p's four fp16
    pairs at [p], [K/8 + p], [K/4 + p], [3K/8 + p], scaled per group so that its largest |x| is X_MAX, and each
    group's factor back (fp32 amax / X_MAX) at [K/2 + g]; the trips then load them in the words' layout. BLOCK_G
    groups an iteration: the phase's trip tile has a thread for every 16 of its words, so BLOCK_C x its groups a
    trip / 16 gives each thread a word row (the trip's BLOCK_G left half of them idle: twice the iterations)."""
    GP: tl.constexpr = GROUP // 8
    G = K // GROUP
    KW = K // 8
    gs = tl.arange(0, BLOCK_G)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + gs
        x0, x1, x2, x3, x4, x5, x6, x7 = _group_x(x_ptr, nw_ptr, inv_rms, g, K, GP, GATED, NORMED)
        amax = tl.maximum(tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))),
                          tl.maximum(tl.maximum(tl.abs(x4), tl.abs(x5)), tl.maximum(tl.abs(x6), tl.abs(x7))))
        amax = tl.maximum(tl.max(amax, 1), 1e-30)  # the group's largest |x|: [BLOCK_G]
        inv = X_MAX / amax[:, None]
        odd = inv * 0.0625  # the odd pairs' nibbles decode as 16 (q - z)
        p = g[:, None] * GP + tl.arange(0, GP)[None, :]
        m = (g < G)[:, None]
        tl.store(xs_ptr + p, pack_half2(x0 * inv, x4 * inv, ASM), mask=m)
        tl.store(xs_ptr + KW + p, pack_half2(x1 * odd, x5 * odd, ASM), mask=m)
        tl.store(xs_ptr + 2 * KW + p, pack_half2(x2 * inv, x6 * inv, ASM), mask=m)
        tl.store(xs_ptr + 3 * KW + p, pack_half2(x3 * odd, x7 * odd, ASM), mask=m)
        tl.store(xs_ptr.to(tl.pointer_type(tl.float32)) + 4 * KW + g, amax * (1.0 / X_MAX), mask=g < G)
    tl.debug_barrier()  # the program's stores before any of its threads loads them


@triton.jit
def _staged_x(xs_ptr, g, half, K, G, HP: tl.constexpr):
    """The staged x (int4_stage_x) of the groups g's half 0 or 1 of word rows: four uint32 [BLOCK_G, HP]."""
    KW = K // 8
    p = g[:, None] * (2 * HP) + half * HP + tl.arange(0, HP)[None, :]
    m = (g < G)[:, None]
    return (tl.load(xs_ptr + p, mask=m, other=0), tl.load(xs_ptr + KW + p, mask=m, other=0),
            tl.load(xs_ptr + 2 * KW + p, mask=m, other=0), tl.load(xs_ptr + 3 * KW + p, mask=m, other=0))


@triton.jit
def _factors(xs_ptr, g, K, G):
    """The staged groups' x factors (fp32 [BLOCK_G]: amax / X_MAX)."""
    return tl.load(xs_ptr.to(tl.pointer_type(tl.float32)) + K // 2 + g, mask=g < G, other=0.0)


@triton.jit
def int4_first_tile(qw_ptr, s_ptr, z_ptr, N, K, cols, cmask, BLOCK_G: tl.constexpr, GROUP: tl.constexpr):
    """The first trip of the columns cols: its words (_words_pair), scales and zeros (_group_scales), the carry
    int4_cols starts a block from (weights and scales: no phase writes them, so the phase's first block's load
    before its barrier)."""
    gs = tl.arange(0, BLOCK_G)
    G = K // GROUP
    wa, wb = _words_pair(qw_ptr, gs, cols, cmask, N, G, GROUP // 16)
    s, z = _group_scales(s_ptr, z_ptr, gs, cols, cmask, N, G, GROUP // 16)
    return wa, wb, s, z


@triton.jit
def int4_cols(xs_ptr, qw_ptr, s_ptr, z_ptr, cols, cmask, next_cols, next_cmask, N, K: tl.constexpr, carry,
              GROUP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, ASM: tl.constexpr):
    """(fp32 [BLOCK_C] (W x)[cols], the next block's carry) for the INT4 weight (qweight, scales, zeros as the
    module docstring says), x staged by int4_stage_x at xs_ptr, BLOCK_G whole groups a trip (_words_pair: a
    group's scale and zero loaded once for its two words a thread). carry: this block's first trip
    (int4_first_tile), already requested; each trip requests the next one's words, x, scales and zeros before its
    products, and the last trip requests the first trip of the program's next block (next_cols): at one program
    an SM a block that loaded its own first trip, or a trip its own scales, waited a round trip to memory with
    nothing else in flight."""
    HP: tl.constexpr = GROUP // 16  # word rows a group's half
    G: tl.constexpr = K // GROUP
    TRIPS: tl.constexpr = (G + BLOCK_G - 1) // BLOCK_G
    gs = tl.arange(0, BLOCK_G)
    acc = tl.zeros([BLOCK_G, HP, BLOCK_C], dtype=tl.float32)
    wa, wb, s, z = carry
    xs_a, xs_b, f = _staged_x(xs_ptr, gs, 0, K, G, HP), _staged_x(xs_ptr, gs, 1, K, G, HP), _factors(xs_ptr, gs, K, G)
    for t in range(0, TRIPS - 1):
        wa_step, wb_step, ya, yb, f_step, s_step, z_step = wa, wb, xs_a, xs_b, f, s, z
        gn = (t + 1) * BLOCK_G + gs
        wa, wb = _words_pair(qw_ptr, gn, cols, cmask, N, G, HP)
        xs_a, xs_b = _staged_x(xs_ptr, gn, 0, K, G, HP), _staged_x(xs_ptr, gn, 1, K, G, HP)
        f = _factors(xs_ptr, gn, K, G)
        s, z = _group_scales(s_ptr, z_ptr, gn, cols, cmask, N, G, HP)
        acc += _pair_dots(wa_step, wb_step, z_step, ya, yb, ASM) * (s_step * f_step[:, None, None])
    nxt = int4_first_tile(qw_ptr, s_ptr, z_ptr, N, K, next_cols, next_cmask, BLOCK_G, GROUP)
    acc += _pair_dots(wa, wb, z, xs_a, xs_b, ASM) * (s * f[:, None, None])
    return tl.sum(tl.sum(acc, 1), 0), nxt


def int4_scratch_words(k: int) -> int:
    """uint32 words of a program's INT4 scratch (int4_stage_x) for inputs of up to k features: the pairs (k / 2)
    and the groups' factors (at most k / 8)."""
    return k // 2 + k // 8


def int4_group_fits(group: int | None) -> bool:
    """Whether the phase takes INT4 groups of this size: 16 times a power of two (half a group's word rows are
    one tensor dimension; a word never straddles two groups). Channel-wise INT4 (one group over all of K) fits
    only where K does."""
    return bool(group) and group % 16 == 0 and (group // 16) & (group // 16 - 1) == 0


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
