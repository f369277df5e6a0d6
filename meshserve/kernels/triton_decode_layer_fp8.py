"""The decode layer kernel's GEMV phases over fp8 weights (e4m3 with a scale per output row, the batch-1 path's
weight-only semantics: layers/quantization/fp8.py): one row block as the words GEMV computes it.

The weight is read as uint32 words (four e4m3 features each), each word's four products taken in fp16 against x
scaled so that the word's largest |x| is 32 (triton_fp8_gemv._words_products: inline PTX on the GPU, the same
fp16 lanes spelled with tensors in the interpreter), the partial sums in fp32 and the row's scale applied once.
x is the layer kernel's input row as _row_x gives it (rms_norm's output on load, or silu(gate) * up), fetched
at features 4j..4j+3 of the words j: the normed row never goes through memory. Tiles keep the bf16 phase's
bytes a thread (half as many words as 16-bit values): words_phase_tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from meshserve.kernels.triton_attention import _next_pow2
from meshserve.kernels.triton_fp8_gemv import _words_products
from meshserve.kernels.triton_gemv import _row_x


@triton.jit
def _x_of_words(x_ptr, nw_ptr, inv_rms, jj, jmask, K, GATED: tl.constexpr, NORMED: tl.constexpr):
    """The input row at the features of the weight words jj [W]: four fp32 [W], features 4j..4j+3."""
    c = jj * 4
    return (_row_x(x_ptr, nw_ptr, inv_rms, c, jmask, K, GATED, NORMED),
            _row_x(x_ptr, nw_ptr, inv_rms, c + 1, jmask, K, GATED, NORMED),
            _row_x(x_ptr, nw_ptr, inv_rms, c + 2, jmask, K, GATED, NORMED),
            _row_x(x_ptr, nw_ptr, inv_rms, c + 3, jmask, K, GATED, NORMED))


@triton.jit
def fp8_rows(x_ptr, nw_ptr, inv_rms, w_ptr, s_ptr, rows, rmask, K, w_pre, GATED: tl.constexpr,
             NORMED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, PRE_W: tl.constexpr,
             ASM: tl.constexpr):
    """fp32 [BLOCK_R]: scale[rows] * (W[rows] x) for the fp8 weight w_ptr as uint32 words [N, K / 4]; its first
    PRE_W words a row from w_pre (loaded before the phase's barrier) when PRE_W > 0, the rest streamed
    BLOCK_W words a trip with the next trip's words requested before this trip's products."""
    KW = K // 4
    w_rows = w_ptr + rows[:, None].to(tl.int64) * KW
    y = tl.zeros([BLOCK_R], dtype=tl.float32)
    if PRE_W > 0:
        jp = tl.arange(0, PRE_W)
        p0, p1, p2, p3 = _x_of_words(x_ptr, nw_ptr, inv_rms, jp, jp < KW, K, GATED, NORMED)
        y += tl.sum(_words_products(w_pre, p0, p1, p2, p3, ASM), 1)
    js = tl.arange(0, BLOCK_W)
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    w_next = tl.load(w_rows + (PRE_W + js)[None, :], mask=rmask[:, None] & (PRE_W + js < KW)[None, :], other=0)
    for j0 in range(PRE_W, KW, BLOCK_W):
        jj = j0 + js
        w = w_next
        jn = jj + BLOCK_W  # past the row on the last trip: masked off, nothing read
        w_next = tl.load(w_rows + jn[None, :], mask=rmask[:, None] & (jn < KW)[None, :], other=0)
        f0, f1, f2, f3 = _x_of_words(x_ptr, nw_ptr, inv_rms, jj, jj < KW, K, GATED, NORMED)
        acc += _words_products(w, f0, f1, f2, f3, ASM)
    y += tl.sum(acc, 1)
    return y * tl.load(s_ptr + rows, mask=rmask, other=0.0)


def words_phase_tile(rows: int, block_k: int, pre_k: int, k: int) -> tuple[int, int, int]:
    """(rows, words a streamed tile, words preloaded) of an fp8 GEMV phase over rows of k features, from the
    16-bit phase's tile (gemv_phase_tile): the same bytes a thread (a word per two 16-bit values), within the
    row's words (a power of two <= k / 4 preloaded)."""
    words = k // 4
    return rows, min(_next_pow2(words), max(16, block_k // 2)), min(1 << (words.bit_length() - 1), max(16, pre_k // 2))
