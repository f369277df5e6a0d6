"""The per-tile step the Triton attention kernels share: one KV tile of an fp32 online softmax.

* ``online_softmax_step``: fold a tile's scores (log2 units, scale folded in) into the running max and sum;
  every attention kernel's tile (paged prefill, unified and decode, MLA prefill and decode).
* ``attend_paged_kv_tile``: one tile of BLOCK_N tokens of the paged KV cache [2, blocks, block_size, Hkv, D],
  gathered through the block table: K load, scores, causal / window / validity mask, softmax step, V load,
  accumulate. The prefill, unified and split-K decode kernels of triton_attention.py and
  triton_unified_attention.py walk their KV ranges with it.
* ``attend_full_kv_tile``: the same without masks, for the causal kernels' tiles that lie wholly below the
  diagonal (AttentionTileConfig.diag_mask_only).
* ``dot_query``: q in the dtype of the tile's dots, converted once per program before the KV loop.
* ``load_v_transposed``: a V tile of an fp8 cache whose blocks hold V as [Hkv, D, block_size]
  (kernels/kv_layout.py; the V_T constexpr of the functions above).

FP8_TILE "words" (the decode kernel's MESHSERVE_DECODE_FP8_PATH=words): K and V read as 32-bit words in the
cache's layout and widened to fp16 before the shared-memory trip to the dots (triton_e4m3_words.py says why);
the same converted values, scales and products as the default ("convert").

An fp8 (e4m3) cache: the tiles go straight to the dot dtype, fp16 for 16-bit models: every e4m3 value is exact
in fp16 and the conversion is one instruction per two elements, where e4m3 -> fp32 -> * scale -> bf16 took
several per element: at 1 byte per element that work likely bounds the decode kernel by the ALUs, not the
copy bandwidth (fp8 KV decoded slower than bf16 KV on the H200, issue 20). k_scale joins the scalar score
scale and v_scale multiplies the tile's P.V product [ROWS, D] instead of the V tile [BLOCK_N, D]; the query
(bf16) is rounded to fp16 once (exact for |q| in fp16's normal range, clamped at +-65504) and P is rounded to
fp16 instead of bf16.

Triton inlines @triton.jit calls, so a kernel compiles to the same code as with the step written in its loop.
"""

from __future__ import annotations

import triton
import triton.language as tl

from meshserve.kernels.triton_e4m3_words import load_e4m3_tile


@triton.jit
def online_softmax_step(qk, m_i, l_i):
    """(p, alpha, m_new, l_new) for scores qk [ROWS, N]: p = exp2(qk - m_new) is the tile's weights, alpha
    rescales what was accumulated under the old max m_i. Masked scores are -inf (p 0); m_i starts finite
    (_NEG_BIG), so a row with nothing visible yet stays at p 0, never nan."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def dot_query(q, UPCAST_DOT: tl.constexpr, KV_FP8: tl.constexpr):
    """q [ROWS, BLOCK_D] in the tile's dot dtype: fp32 under the interpreter's upcast (its bf16 dot is wrong),
    fp16 for a bf16 query over an fp8 cache (see the module docstring), else q's own dtype."""
    if UPCAST_DOT:  # (one return: Triton rejects returns of different types)
        q = q.to(tl.float32)
    elif KV_FP8:  # noqa: SIM102 (Triton: nested constexpr tests, as elsewhere)
        if q.dtype == tl.bfloat16:
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


@triton.jit
def load_v_transposed(v_base, blk, kv_pos, d, d_mask, stride_cb, BLOCK_SIZE: tl.constexpr):
    """[BLOCK_N, BLOCK_D] V of the tokens kv_pos (block ids blk) from blocks holding V as [Hkv, D, block_size]
    (v_base: this KV head's V in block 0). Tokens contiguous in runs of BLOCK_SIZE, so the copy is 16-byte
    vectors (cp.async under the pipeliner) and the dot reads its operand by ldmatrix; no token mask, which would
    break the vectors: every token read is a finite cache byte (the pool is zeroed and every writer saturates at
    +-448), and the tokens past the end have p = 0. The hint says each run of BLOCK_SIZE tokens is one block's:
    a vector's address is its first token's, so a run's visible tokens must not follow masked ones (whose blk
    is 0): callers mask only past the end (kv_valid = kv_pos < seq_len; a window masks scores, not kv_valid)."""
    voff = tl.max_contiguous(tl.multiple_of(blk * stride_cb + kv_pos % BLOCK_SIZE, BLOCK_SIZE), BLOCK_SIZE)
    return tl.load(v_base + voff[:, None] + d[None, :] * BLOCK_SIZE, mask=d_mask[None, :], other=0.0)


@triton.jit
def attend_paged_kv_tile(
    q,
    q_pos,
    acc,
    m_i,
    l_i,
    kv_pos,
    kv_valid,
    window,
    bt_row,
    k_base,
    v_base,
    d,
    d_mask,
    scale_log2,
    k_scale,
    v_scale,
    stride_cb,
    stride_cs,
    stride_cd,
    BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_TILE: tl.constexpr,
    V_T: tl.constexpr,
):
    """(acc, m_i, l_i) after the KV tokens kv_pos [BLOCK_N] (those with kv_valid; block table row bt_row, K/V
    of one KV head at k_base / v_base) for the queries q [ROWS, BLOCK_D] (from dot_query) at positions q_pos.
    V_T: V stored as [Hkv, D, block_size] in each block (load_v_transposed; K keeps FP8_TILE's read).
    CAUSAL: a query sees keys up to its position (and with USE_WINDOW only the last `window`); else every
    valid key (the decode kernel takes CAUSAL with q_pos at the sequence's last position where it has a window:
    kv_valid must not carry the window, load_v_transposed says why). FP8_TILE: how an fp8 tile is read
    (triton_e4m3_words.FP8_TILES; not "convert": only where triton_e4m3_words.words_fit). No default: Triton
    3.6 (the device's) passes a called function's default constexpr through unwrapped and fails to compile."""
    blk = tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
    off = blk * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cs
    WORDS: tl.constexpr = KV_FP8 and FP8_TILE != "convert"
    if WORDS:  # [BLOCK_N, BLOCK_D] fp16 (K / k_scale), converted before its trip through shared memory
        k = load_e4m3_tile(k_base, off, kv_valid, d.shape[0], FP8_TILE == "words")
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * (scale_log2 * k_scale)
    else:
        k = tl.load(
            k_base + off[None, :] + d[:, None] * stride_cd, mask=kv_valid[None, :] & d_mask[:, None], other=0.0
        )  # [BLOCK_D, BLOCK_N]
        if KV_FP8:  # the cache holds K / k_scale: e4m3 -> q's dtype (exact), k_scale on the scores
            qk = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * (scale_log2 * k_scale)
        else:
            qk = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2
    if CAUSAL:
        mask = kv_valid[None, :] & (kv_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            mask = mask & (kv_pos[None, :] > q_pos[:, None] - window)
    else:
        mask = kv_valid[None, :]
    qk = tl.where(mask, qk, float("-inf"))
    p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
    if V_T:
        v = load_v_transposed(v_base, blk, kv_pos, d, d_mask, stride_cb, BLOCK_SIZE)
    elif WORDS:
        v = load_e4m3_tile(v_base, off, kv_valid, d.shape[0], FP8_TILE == "words")
    else:
        v = tl.load(
            v_base + off[:, None] + d[None, :] * stride_cd, mask=kv_valid[:, None] & d_mask[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_D]
    pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    if KV_FP8:  # V / v_scale in the cache: scale the [ROWS, D] product, not the [BLOCK_N, D] tile
        pv = pv * v_scale
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def attend_full_kv_tile(
    q,
    acc,
    m_i,
    l_i,
    kv_pos,
    bt_row,
    k_base,
    v_base,
    d,
    d_mask,
    scale_log2,
    k_scale,
    v_scale,
    stride_cb,
    stride_cs,
    stride_cd,
    BLOCK_SIZE: tl.constexpr,
    EVEN_D: tl.constexpr,
    KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    V_T: tl.constexpr,
):
    """attend_paged_kv_tile for a tile every query row sees whole (below the causal diagonal, inside the
    window): no score mask and, with EVEN_D (BLOCK_D == head_dim), no load predicates."""
    blk = tl.load(bt_row + kv_pos // BLOCK_SIZE).to(tl.int64)
    off = blk * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cs
    if EVEN_D:
        k = tl.load(k_base + off[None, :] + d[:, None] * stride_cd)  # [BLOCK_D, BLOCK_N]
    else:
        k = tl.load(k_base + off[None, :] + d[:, None] * stride_cd, mask=d_mask[:, None], other=0.0)
    if KV_FP8:  # K / k_scale in the cache: k_scale joins the score scale (see the module docstring)
        scale_log2 = scale_log2 * k_scale
    # online_softmax_step with the scale applied in the exponent's FMA (scale_log2 > 0, so the row max of the
    # scaled scores is the scaled row max): one op per score fewer on the tiles that dominate a long prompt
    qk = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if V_T:
        v = load_v_transposed(v_base, blk, kv_pos, d, d_mask, stride_cb, BLOCK_SIZE)
    elif EVEN_D:
        v = tl.load(v_base + off[:, None] + d[None, :] * stride_cd)  # [BLOCK_N, BLOCK_D]
    else:
        v = tl.load(v_base + off[:, None] + d[None, :] * stride_cd, mask=d_mask[None, :], other=0.0)
    pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    if KV_FP8:  # V / v_scale in the cache: scale the [ROWS, D] product
        pv = pv * v_scale
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i
