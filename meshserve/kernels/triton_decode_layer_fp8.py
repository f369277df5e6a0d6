"""The decode layer kernel's GEMV phases over fp8 weights (e4m3 with a scale per output row, the batch-1 path's
weight-only semantics: layers/quantization/fp8.py): one row block as the words GEMV computes it.

The weight is read as uint32 words (four e4m3 features each), each word's four products taken in fp16 against x
scaled so that the word's largest |x| is 32 (triton_fp8_gemv._words_products: inline PTX on the GPU, the same
fp16 lanes spelled with tensors in the interpreter), the partial sums in fp32 and the row's scale applied once.
x is the layer kernel's input row as triton_gemv._row_x gives it (rms_norm's output on load, or silu(gate) *
up), read four features (8 bytes) a load at the words' features 4j..4j+3: the normed row never goes through
memory. Tiles keep the bf16 phase's bytes a thread (half as many words as 16-bit values): words_phase_tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from meshserve.kernels.triton_attention import _next_pow2
from meshserve.kernels.triton_fp8_gemv import _words_products, _x_quads
from meshserve.kernels.triton_ops import silu_mul


@triton.jit
def _quads(ptr, jj, KW):
    """The 16-bit row at ptr at the features of the words jj [W] below KW (four a word, one 8-byte load each) as
    four fp32 [W], features 4j..4j+3."""
    return _x_quads(ptr.to(tl.pointer_type(tl.uint64)), jj, KW, False, ptr.dtype.element_ty == tl.bfloat16)


@triton.jit
def _x_of_words(x_ptr, nw_ptr, inv_rms, jj, K, GATED: tl.constexpr, NORMED: tl.constexpr):
    """_row_x at the features of the weight words jj [W] (the same values: rms_norm's output, silu(gate) * up,
    or the row) as four fp32 [W], features 4j..4j+3, from 8-byte loads as the words GEMV reads x (two loads a word
    where per-feature loads took eight; x still reaches the words' register layout through shared memory on each
    trip, sm_90: 6 barriers a trip at 16 rows on 8 warps, as the plain GEMVs' x does)."""
    dt = x_ptr.dtype.element_ty
    x0, x1, x2, x3 = _quads(x_ptr, jj, K // 4)
    if NORMED:
        n0, n1, n2, n3 = _quads(nw_ptr, jj, K // 4)
        x0 = (n0 * (x0 * inv_rms).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x1 = (n1 * (x1 * inv_rms).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (n2 * (x2 * inv_rms).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x3 = (n3 * (x3 * inv_rms).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    elif GATED:  # x_ptr holds [gate | up] of K each
        u0, u1, u2, u3 = _quads(x_ptr + K, jj, K // 4)
        x0 = silu_mul(x0, u0, dt).to(tl.float32)
        x1 = silu_mul(x1, u1, dt).to(tl.float32)
        x2 = silu_mul(x2, u2, dt).to(tl.float32)
        x3 = silu_mul(x3, u3, dt).to(tl.float32)
    return x0, x1, x2, x3


@triton.jit
def fp8_carry(x_ptr, nw_ptr, inv_rms, w, K: tl.constexpr, FIRST: tl.constexpr, GATED: tl.constexpr,
              NORMED: tl.constexpr, BLOCK_W: tl.constexpr):
    """The carry fp8_rows starts a block from: w, the rows' tile of words FIRST..FIRST + BLOCK_W (requested), and
    x at those words (four fp32 [BLOCK_W])."""
    f0, f1, f2, f3 = _x_of_words(x_ptr, nw_ptr, inv_rms, FIRST + tl.arange(0, BLOCK_W), K, GATED, NORMED)
    return w, f0, f1, f2, f3


@triton.jit
def fp8_first_carry(x_ptr, nw_ptr, inv_rms, w_ptr, rows, rmask, K: tl.constexpr, GATED: tl.constexpr,
                    NORMED: tl.constexpr, BLOCK_W: tl.constexpr):
    """fp8_carry of the rows' first tile (words 0..BLOCK_W), requested here."""
    KW: tl.constexpr = K // 4
    js = tl.arange(0, BLOCK_W)
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * KW + js[None, :], mask=rmask[:, None] & (js < KW)[None, :],
                other=0)
    return fp8_carry(x_ptr, nw_ptr, inv_rms, w, K, 0, GATED, NORMED, BLOCK_W)


@triton.jit
def fp8_rows(x_ptr, nw_ptr, inv_rms, w_ptr, s_ptr, rows, rmask, next_rows, next_rmask, K: tl.constexpr, w_pre, carry,
             GATED: tl.constexpr, NORMED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
             PRE_W: tl.constexpr, ASM: tl.constexpr):
    """(fp32 [BLOCK_R] scale[rows] * (W[rows] x), the next block's carry) for the fp8 weight w_ptr as uint32
    words [N, K / 4]; its first PRE_W words a row from w_pre (loaded before the phase's barrier) when PRE_W > 0,
    the rest streamed BLOCK_W words a trip from carry (fp8_carry: the tile at word PRE_W, already requested, and
    x there), each trip requesting the next one's words and x before its products (the words GEMV's rotated
    loop: x carried in the words' layout) and the last the program's next block's carry (next_rows, words
    0..BLOCK_W): each block's first tile, and its x, were a round trip to memory with nothing in flight. A row of
    PRE_W words or fewer streams nothing and hands the carry on."""
    KW: tl.constexpr = K // 4
    TRIPS: tl.constexpr = (KW - PRE_W + BLOCK_W - 1) // BLOCK_W
    w_rows = w_ptr + rows[:, None].to(tl.int64) * KW
    scale = tl.load(s_ptr + rows, mask=rmask, other=0.0)  # requested before the stream, used after it
    y = tl.zeros([BLOCK_R], dtype=tl.float32)
    if PRE_W > 0:
        jp = tl.arange(0, PRE_W)
        p0, p1, p2, p3 = _x_of_words(x_ptr, nw_ptr, inv_rms, jp, K, GATED, NORMED)
        y += tl.sum(_words_products(w_pre, p0, p1, p2, p3, ASM), 1)
    if TRIPS > 0:
        w, f0, f1, f2, f3 = carry
        js = tl.arange(0, BLOCK_W)
        acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
        for t in range(0, TRIPS - 1):
            w_step, g0, g1, g2, g3 = w, f0, f1, f2, f3
            jn = PRE_W + (t + 1) * BLOCK_W + js
            w = tl.load(w_rows + jn[None, :], mask=rmask[:, None] & (jn < KW)[None, :], other=0)
            f0, f1, f2, f3 = _x_of_words(x_ptr, nw_ptr, inv_rms, jn, K, GATED, NORMED)
            acc += _words_products(w_step, g0, g1, g2, g3, ASM)
        nxt = fp8_first_carry(x_ptr, nw_ptr, inv_rms, w_ptr, next_rows, next_rmask, K, GATED, NORMED, BLOCK_W)
        acc += _words_products(w, f0, f1, f2, f3, ASM)
        y += tl.sum(acc, 1)
    else:
        nxt = carry
    return y * scale, nxt


def words_phase_tile(rows: int, block_k: int, pre_k: int, k: int) -> tuple[int, int, int]:
    """(rows, words a streamed tile, words preloaded) of an fp8 GEMV phase over rows of k features, from the
    16-bit phase's tile (gemv_phase_tile): the same bytes a thread (a word per two 16-bit values), within the
    row's words (a power of two <= k / 4 preloaded)."""
    words = k // 4
    return rows, min(_next_pow2(words), max(16, block_k // 2)), min(1 << (words.bit_length() - 1), max(16, pre_k // 2))
