"""An fp8 (e4m3) KV tile read as 32-bit words in the cache's own layout and widened to fp16 in registers, for
the decode kernel's "words" fp8 path (MESHSERVE_DECODE_FP8_PATH=words; the default path is "convert").

Why: the default fp8 tile lets Triton convert after its shared-memory load in the dot-operand layout. V
[BLOCK_N, D] is the B operand of P.V with its reduction axis (tokens) across the cache's rows, and sm_90 has
no transposing 8-bit ldmatrix, so every V byte is one LDS.U8 plus register moves to pack pairs for
F2FP: the KV loop of _decode_split_kernel runs 1,027 SASS instructions per thread per 128-token tile (128
LDS.U8, 141 IMAD.MOV) against 575 for a bf16 tile of twice the bytes (tools/decode_attention_sass.py). Here the
words are converted where they land (four e4m3 per word, two cvt.rn.f16x2.e4m3x2: the instruction .to(fp16)
compiles to, so the values are the same bits), and the fp16 tile reaches the dot through shared memory
as a bf16 tile does (STS.128, then LDSM / LDSM.T): 657 per tile, no byte loads, 144 registers instead of 201.
tl.join + tl.reshape put the four halves of a word back in d order; they also keep Triton from moving the
conversion behind the dot-operand load (an elementwise conversion of the [BLOCK_N, D] tile, PTX or not, was
moved there and compiled to the byte loads again).

* ``e4m3x4_to_f16``: the four e4m3 bytes of each uint32 word (byte 0 first) as four fp16 tensors.
* ``load_e4m3_tile``: the [BLOCK_N, BLOCK_D] fp16 tile of the tokens at `off` (element offsets, each a
  multiple of 4), invalid tokens' rows 0. The host takes this path only where head_dim == BLOCK_D (a power of
  two) and the cache's strides allow it (``words_fit``).
"""

from __future__ import annotations

import triton
import triton.language as tl

# the decode kernel's fp8 tile paths (its FP8_TILE constexpr): "words_bytes" is "words" with the conversion
# spelled per byte through .to() (the CPU interpreter runs no inline PTX; compiled, it costs PRMTs per byte)
FP8_PATHS = ("convert", "words")
FP8_TILES = ("convert", "words", "words_bytes")


def words_fit(kv_cache) -> bool:
    """Whether the words tile can read this fp8 cache [2, blocks, block_size, Hkv, D]: D a power of two >= 16
    (the tile's BLOCK_D, no d mask), d contiguous, every other stride and the base 4-byte aligned."""
    d = kv_cache.shape[-1]
    return (d >= 16 and d & (d - 1) == 0 and kv_cache.stride(-1) == 1
            and all(s % 4 == 0 for s in kv_cache.stride()[:-1]) and kv_cache.data_ptr() % 4 == 0)


@triton.jit
def e4m3x4_to_f16(w, ASM: tl.constexpr):
    """(h0, h1, h2, h3): bytes 0..3 of the uint32 words w as fp16 (exact: e4m3 values are all fp16 values)."""
    if ASM:  # cvt.rn.f16x2.e4m3x2 widens a 16-bit pair: the low byte into the low half
        h0, h1, h2, h3 = tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; .reg .b32 a, b; mov.b32 {lo, hi}, $4; cvt.rn.f16x2.e4m3x2 a, lo; "
            "cvt.rn.f16x2.e4m3x2 b, hi; mov.b32 {$0, $1}, a; mov.b32 {$2, $3}, b; }",
            "=h,=h,=h,=h,r", [w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1,
        )
    else:
        h0 = (w & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        h1 = ((w >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        h2 = ((w >> 16) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        h3 = (w >> 24).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return h0, h1, h2, h3


@triton.jit
def load_e4m3_tile(base, off, kv_valid, BLOCK_D: tl.constexpr, ASM: tl.constexpr):
    """fp16 [BLOCK_N, BLOCK_D]: element (n, j) = the e4m3 at base + off[n] + j (contiguous d, BLOCK_D the head
    dimension: no d mask, which would cost the 16-byte copies), 0 where not kv_valid[n]."""
    words = base.to(tl.pointer_type(tl.uint32))
    dw = tl.arange(0, BLOCK_D // 4)
    w = tl.load(words + (off >> 2)[:, None] + dw[None, :], mask=kv_valid[:, None], other=0)
    h0, h1, h2, h3 = e4m3x4_to_f16(w, ASM)
    # [N, D/4, 2, 2] with [.., a, b] = h_{2a+b}: element 4 * word + 2a + b, d order once flattened
    return tl.reshape(tl.join(tl.join(h0, h2), tl.join(h1, h3)), [w.shape[0], BLOCK_D])
