"""The decode kernel's "fp8dot" path (MESHSERVE_DECODE_FP8_PATH=fp8dot): e4m3 tensor-core dots on the fp8 cache's
tiles as stored, as FlashAttention-3's fp8 path does, so no K or V element is converted to 16 bits.

* ``e4m3_query``: q [ROWS, D] as e4m3 with a per-row scale (amax / 448), once per program.
* ``attend_e4m3_dot_tiles``: a decode program's KV tiles: scores = dot(q8, K8) (fp32) * the row's q scale *
  k_scale * the softmax scale (log2 units); P * 448 (P in [0, 1]) rounded to e4m3 for dot(P8, V8) (fp32);
  the online softmax's max and sum in fp32 over the unrounded P; v_scale once at the end. The 448 rides in
  the sum too and cancels in acc / l (and in the split reduce, every partial carrying it).
* ``e4m3_dot_fit``: the caches it reads (words_fit's, and blocks of a multiple of 4 tokens).

Triton emits fp8 MMA on sm_90 only as wgmma (MMA v3): a dot it lowers to mma.sync (MMA v2: M not a multiple of
64, here BLOCK_N or head_dim, or fewer than 4 warps) gets its fp8 operands converted to fp16 (AccelerateMatmul's
decomposeMixedModeDotOp; still correct, as the interpreter tests' small tiles are), the cost this path avoids;
so the 2-warp grid tile has an fp8dot one of its own (triton_attention.FP8DOT_GRID_TILE). wgmma
takes 8-bit operands only K-major (no transpose for them), M in 64-row steps over a warpgroup. A decode program
has ROWS = 16 query rows, so its tile is computed transposed: scores^T [BLOCK_N, ROWS] = K [BLOCK_N, D] . q8^T
(M = BLOCK_N; K and q8 are d-contiguous, K-major: K goes from cp.async to the wgmma untouched) and out^T [D, ROWS]
= V^T [D, BLOCK_N] . P8^T, with the softmax down the columns. V's reduction axis (tokens) runs across the
cache's rows, so V^T is built in registers: the 32-bit words of every fourth token (four loads) are transposed
4 x 4 bytes (8 PRMT per 16 bytes) into words of 4 consecutive tokens, which go to shared memory 4 bytes at a
time. Triton's own transpose of an e4m3 [BLOCK_N, D] tile, or of the same bytes joined as 8-bit elements, moves
them byte by byte (~3 instructions a byte; tools/decode_attention_sass.py counts the loop).
"""

from __future__ import annotations

import triton
import triton.language as tl

from meshserve.kernels.triton_e4m3_words import words_fit

E4M3_MAX = tl.constexpr(448.0)  # e4m3's largest finite value: q's rows and P are scaled to it
_LOG2_E4M3_MAX = tl.constexpr(8.807354922057604)  # log2(448)
_NEG_BIG = tl.constexpr(-1.0e30)  # as triton_attention's running-max init


def e4m3_dot_fit(kv_cache) -> bool:
    """Whether the fp8dot tiles can read this fp8 cache [2, blocks, block_size, Hkv, D]: the words tile's layout
    (words_fit) and a block size that is a multiple of 4 (4 consecutive tokens share a block)."""
    return words_fit(kv_cache) and kv_cache.shape[2] % 4 == 0


@triton.jit
def _to_e4m3(x, HW_CAST: tl.constexpr):
    """x (fp32) to e4m3, rounded to nearest even, saturated at +-448. HW_CAST: the cast alone (cvt.rn.satfinite on
    the GPU); else x goes onto e4m3's grid in fp32 first (exact: power-of-two scales, the 1.5 * 2^23 rounding)
    and the cast only moves exact values: the interpreter's own cast mis-rounds where the mantissa carries into
    the exponent (31.7 -> 16)."""
    if not HW_CAST:
        x = tl.clamp(x, -E4M3_MAX, E4M3_MAX)
        e = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # subnormals: -6's grid
        x = x * ((130 - e) << 23).to(tl.float32, bitcast=True)  # * 2^(3 - e): 3 mantissa bits above the point
        x = ((x + 12582912.0) - 12582912.0) * ((124 + e) << 23).to(tl.float32, bitcast=True)
    return x.to(tl.float8e4nv)


@triton.jit
def e4m3_query(q, HW_CAST: tl.constexpr):
    """(q8, q_scale): q [ROWS, D] ~= q8 * q_scale, q8 e4m3, q_scale the row's amax / 448 (fp32 [ROWS, 1]; 1 for an
    all-zero row: the GQA padding rows)."""
    qf = q.to(tl.float32)
    amax = tl.max(tl.abs(qf), 1, keep_dims=True)
    q_scale = tl.where(amax > 0, amax / E4M3_MAX, 1.0)
    return _to_e4m3(qf / q_scale, HW_CAST), q_scale


@triton.jit
def _visible(kv_pos, seq_len, kv_lo, USE_WINDOW: tl.constexpr):
    valid = kv_pos < seq_len
    if USE_WINDOW:
        valid = valid & (kv_pos >= kv_lo)
    return valid


@triton.jit
def _load_vt(v_base, bt_row, start, seq_len, kv_lo, stride_cb, stride_cs,
             BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
             ASM: tl.constexpr):
    """V^T [BLOCK_D, BLOCK_N] e4m3 of the tokens start + n (invalid ones 0): the words of tokens start + 4 i + j
    (j = 0..3) transposed 4 x 4 bytes, each thread's 4 consecutive registers of the result one word of 4
    consecutive tokens at one d. ASM: the PRMT transpose; else the same bytes by shifts (the interpreter)."""
    kv4 = start + tl.arange(0, BLOCK_N // 4) * 4
    blk = tl.load(bt_row + kv4 // BLOCK_SIZE, mask=kv4 < seq_len, other=0).to(tl.int64)  # one block per 4 tokens
    off = (blk * stride_cb + (kv4 % BLOCK_SIZE) * stride_cs) >> 2
    words = v_base.to(tl.pointer_type(tl.uint32)) + off[:, None] + tl.arange(0, BLOCK_D // 4)[None, :]
    w0 = tl.load(words, mask=_visible(kv4, seq_len, kv_lo, USE_WINDOW)[:, None], other=0)
    w1 = tl.load(words + (stride_cs >> 2), mask=_visible(kv4 + 1, seq_len, kv_lo, USE_WINDOW)[:, None], other=0)
    w2 = tl.load(words + (stride_cs >> 1), mask=_visible(kv4 + 2, seq_len, kv_lo, USE_WINDOW)[:, None], other=0)
    w3 = tl.load(words + 3 * (stride_cs >> 2), mask=_visible(kv4 + 3, seq_len, kv_lo, USE_WINDOW)[:, None], other=0)
    # [N / 4, D / 4, 4]: [i, dw, j] = w_j[i, dw] (tl.join's new axis is a thread's fastest: [.., a, b] = w_{2a+b})
    w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK_N // 4, BLOCK_D // 4, 4])
    if ASM:
        # [i, dw, k, j] = byte k of w_j (token 4 i + j, d = 4 dw + k), 16 bytes a call: the asm's 16 inputs are
        # a thread's 4 words 4 times each (the copies' axis last: w_a in $4a+4..$4a+7), its 4 outputs the 4 x 4
        # transpose, output register k = byte k of w_0..w_3 (e4m3 packed 4 a register, in element order)
        ww = tl.reshape(tl.join(tl.join(w, w), tl.join(w, w)), [BLOCK_N // 4, BLOCK_D // 4, 4, 4])
        vt = tl.inline_asm_elementwise(
            "{ .reg .b32 lo01, hi01, lo23, hi23; "
            "prmt.b32 lo01, $4, $8, 0x5140; prmt.b32 hi01, $4, $8, 0x7362; "
            "prmt.b32 lo23, $12, $16, 0x5140; prmt.b32 hi23, $12, $16, 0x7362; "
            "prmt.b32 $0, lo01, lo23, 0x5410; prmt.b32 $1, lo01, lo23, 0x7632; "
            "prmt.b32 $2, hi01, hi23, 0x5410; prmt.b32 $3, hi01, hi23, 0x7632; }",
            "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r", [ww], dtype=tl.float8e4nv, is_pure=True, pack=16,
        )
    else:
        k = tl.arange(0, 4)
        vt = ((w[:, :, None, :] >> (8 * k[None, None, :, None])) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    return tl.reshape(tl.permute(vt, (1, 2, 0, 3)), [BLOCK_D, BLOCK_N])  # [dw, k, i, j]: V^T


@triton.jit
def attend_e4m3_dot_tiles(q, t0, t1, kv_lo, seq_len, bt_row, k_base, v_base, scale_log2, k_scale, v_scale,
                          stride_cb, stride_cs,
                          BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
                          ASM: tl.constexpr):
    """(acc [ROWS, D], m_i, l_i [ROWS]) of the query rows q [ROWS, D] over the KV tiles [t0, t1) of BLOCK_N tokens
    (those < seq_len, and >= kv_lo with USE_WINDOW) of a cache e4m3_dot_fit takes: attend_paged_kv_tile's
    results (acc unnormalised, the running max in log2 units, the sum; acc and the sum both * 448) with the
    dots in e4m3 (the module docstring). ASM: inline PTX and the hardware's e4m3 cast (not the interpreter)."""
    ROWS: tl.constexpr = q.shape[0]
    BLOCK_D: tl.constexpr = q.shape[1]
    q8, q_scale = e4m3_query(q, ASM)
    q8t = tl.trans(q8)  # [D, ROWS], d-contiguous: K-major
    s_scale = tl.trans(q_scale) * (scale_log2 * k_scale)  # [1, ROWS], > 0: applied in the exponent's FMA
    m_i = tl.full([ROWS], _NEG_BIG, dtype=tl.float32)
    l_t = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)  # the sum's terms, reduced after the loop
    acc = tl.zeros([BLOCK_D, ROWS], dtype=tl.float32)  # out^T
    n_off = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    for t in range(t0, t1):
        kv_pos = t * BLOCK_N + n_off
        kv_valid = _visible(kv_pos, seq_len, kv_lo, USE_WINDOW)
        blk = tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
        off = blk * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cs
        k = tl.load(k_base + off[:, None] + d[None, :], mask=kv_valid[:, None], other=0.0)  # [BLOCK_N, D]
        qk = tl.where(kv_valid[:, None], tl.dot(k, q8t), float("-inf"))  # unscaled scores^T [BLOCK_N, ROWS]
        m_new = tl.maximum(m_i, tl.max(qk, 0) * tl.reshape(s_scale, [ROWS]))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk * s_scale - (m_new - _LOG2_E4M3_MAX)[None, :])  # P * 448, at most 448: e4m3's top
        l_t = l_t * alpha[None, :] + p
        m_i = m_new
        vt = _load_vt(v_base, bt_row, t * BLOCK_N, seq_len, kv_lo, stride_cb, stride_cs, BLOCK_D, BLOCK_SIZE,
                      BLOCK_N, USE_WINDOW, ASM)
        acc = acc * alpha[None, :] + tl.dot(vt, _to_e4m3(p, ASM))  # [D, ROWS]
    return tl.trans(acc * v_scale), m_i, tl.sum(l_t, 0)
