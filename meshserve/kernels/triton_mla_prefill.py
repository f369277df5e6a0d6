"""Triton causal varlen attention for MLA prefill chunks over their expanded context (kernels/mla_prefill.py).

The context of every prefill sequence (cached prefix + this chunk), or one workspace-sized piece of it, has
been gathered from the latent cache and expanded through kv_b_proj into one contiguous buffer, sequence after
sequence: kv [C, H, N + V] (per head K_nope then V, the GEMM's own layout: no copy) and the shared rotary key
k_pe [C, P]. Sequence b owns ctx_len[b] rows from ctx_loc[b]; its query j sits q_off[b] + j rows after the
first of them and sees the rows up to that one (causal, bottom-right aligned when q_off is not given: q_off
= ctx_len - q_len, the whole context in one piece). A piece of cached prefix has q_off >= ctx_len (every row
visible); a piece past a query's position has q_off + j < 0 (none). With an lse buffer the kernel also
writes each row's log-sum-exp (natural log; -inf where no key was visible, with a zero output) for the LSE
merge of the pieces (kernels/triton_lse_merge.py).

* ``_mla_prefill_kernel``: grid (cdiv(max_query_len, BLOCK_Q), H, num_seqs), q tiles fastest so the programs
  running together share one (sequence, head)'s K/V in L2. A program owns BLOCK_Q queries of one head; it
  walks context tiles of BLOCK_N rows with an fp32 online softmax (exp2, scale folded in). The score is two
  dots, q_nope k_nope^T + q_pe k_pe^T, so neither the 192-wide key nor the 128-wide value is padded to a
  power of two (one 256-wide dot would do a third more work on the key and twice on the value, and
  triton_attention's prefill kernel would need V padded into a scratch K/V cache). Tiles wholly below the
  causal diagonal of the program's first query run without masks; the rest are masked.
  Sequences with fewer than min_query_len new tokens (a mixed step's decode and verify rows, which the
  absorbed path serves) are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.triton_attention import _LOG2E, _NEG_BIG, _dot_precision, _next_pow2, _upcast_dot
from meshserve.kernels.triton_attention_tile import online_softmax_step

_LN2 = tl.constexpr(0.6931471805599453)  # log-sum-exp from log2 units to natural ones


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    qn,
    qp,
    kv_ptr,
    kpe_ptr,
    ctx0,
    start,
    q_pos,
    kv_hi,
    head,
    stride_kvt,
    stride_kvh,
    stride_kpt,
    scale_log2,
    NOPE: tl.constexpr,
    BLOCK_NOPE: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_ROPE: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    kv_pos = start + tl.arange(0, BLOCK_N)
    kv_valid = kv_pos < kv_hi
    dn = tl.arange(0, BLOCK_NOPE)
    dp = tl.arange(0, BLOCK_ROPE)
    dv = tl.arange(0, BLOCK_V)
    row = (ctx0 + kv_pos).to(tl.int64)
    k_row = kv_ptr + row * stride_kvt + head * stride_kvh  # [BLOCK_N]
    if MASKED:
        kn = tl.load(k_row[None, :] + dn[:, None], mask=kv_valid[None, :] & (dn[:, None] < NOPE), other=0.0)
        kp = tl.load(
            kpe_ptr + row[None, :] * stride_kpt + dp[:, None],
            mask=kv_valid[None, :] & (dp[:, None] < ROPE),
            other=0.0,
        )
    else:
        kn = tl.load(k_row[None, :] + dn[:, None], mask=dn[:, None] < NOPE, other=0.0)
        kp = tl.load(kpe_ptr + row[None, :] * stride_kpt + dp[:, None], mask=dp[:, None] < ROPE, other=0.0)
    qk = tl.dot(qn, kn.to(qn.dtype), input_precision=DOT_PRECISION)
    qk += tl.dot(qp, kp.to(qp.dtype), input_precision=DOT_PRECISION)
    qk = qk * scale_log2
    if MASKED:
        qk = tl.where(kv_valid[None, :] & (kv_pos[None, :] <= q_pos[:, None]), qk, float("-inf"))
    p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
    if MASKED:
        v = tl.load(
            k_row[:, None] + NOPE + dv[None, :], mask=kv_valid[:, None] & (dv[None, :] < V_DIM), other=0.0
        )
    else:
        v = tl.load(k_row[:, None] + NOPE + dv[None, :], mask=dv[None, :] < V_DIM, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(qn.dtype), v.to(qn.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# the per-step metadata pointers are left unspecialized on alignment: the chunk plan's ctx_loc / ctx_len /
# q_off are rows of [K, B] int64 tensors (mla_prefill.ChunkPlan), so row k starts 16-byte aligned or not with
# k * B; each is read as one scalar per program, where alignment buys nothing (issue 29: a second compile in
# serving)
@triton.jit(do_not_specialize=["ctx_loc_ptr", "ctx_len_ptr", "q_off_ptr", "qsl_ptr"])
def _mla_prefill_kernel(
    qn_ptr,
    qp_ptr,
    kv_ptr,
    kpe_ptr,
    ctx_loc_ptr,
    ctx_len_ptr,
    q_off_ptr,
    qsl_ptr,
    out_ptr,
    lse_ptr,
    scale_log2,
    min_query_len,
    stride_qnt,
    stride_qnh,
    stride_qpt,
    stride_qph,
    stride_kvt,
    stride_kvh,
    stride_kpt,
    stride_ot,
    stride_oh,
    stride_lt,
    NOPE: tl.constexpr,
    BLOCK_NOPE: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_ROPE: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_Q_OFF: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    qt = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    q_tile_start = qt * BLOCK_Q
    if q_tile_start >= q_len:
        return
    if q_len < min_query_len:  # decode / verify rows: the absorbed path's
        return
    ctx_len = tl.load(ctx_len_ptr + b)
    ctx0 = tl.load(ctx_loc_ptr + b)
    if HAS_Q_OFF:
        prefix = tl.load(q_off_ptr + b)
    else:
        prefix = ctx_len - q_len

    qi = q_tile_start + tl.arange(0, BLOCK_Q)
    q_valid = qi < q_len
    q_pos = prefix + qi
    tok = (q_start + qi).to(tl.int64)
    dn = tl.arange(0, BLOCK_NOPE)
    dp = tl.arange(0, BLOCK_ROPE)
    qn = tl.load(
        qn_ptr + tok[:, None] * stride_qnt + head * stride_qnh + dn[None, :],
        mask=q_valid[:, None] & (dn[None, :] < NOPE),
        other=0.0,
    )
    qp = tl.load(
        qp_ptr + tok[:, None] * stride_qpt + head * stride_qph + dp[None, :],
        mask=q_valid[:, None] & (dp[None, :] < ROPE),
        other=0.0,
    )
    if UPCAST_DOT:
        qn = qn.to(tl.float32)
        qp = qp.to(tl.float32)

    m_i = tl.full([BLOCK_Q], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_V], dtype=tl.float32)

    # every query of the tile sees the keys up to its first query's position: those tiles need no mask
    # (clamped at 0 before dividing: a piece can start past a query's position, prefix < 0)
    full_hi = tl.minimum(tl.maximum(prefix + q_tile_start + 1, 0) // BLOCK_N, ctx_len // BLOCK_N) * BLOCK_N
    # the causal limit of the tile's last query, inside the piece
    kv_hi = tl.minimum(prefix + tl.minimum(q_tile_start + BLOCK_Q, q_len), ctx_len)
    # two passes, unrolled at compile time: the tiles below full_hi without masks, then the rest masked
    for masked in tl.static_range(2):
        for start in range(full_hi if masked else 0, kv_hi if masked else full_hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, qn, qp, kv_ptr, kpe_ptr, ctx0, start, q_pos, kv_hi, head,
                stride_kvt, stride_kvh, stride_kpt, scale_log2,
                NOPE, BLOCK_NOPE, ROPE, BLOCK_ROPE, V_DIM, BLOCK_V, BLOCK_N, masked == 1, DOT_PRECISION,
            )  # fmt: skip

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    dv = tl.arange(0, BLOCK_V)
    tl.store(
        out_ptr + tok[:, None] * stride_ot + head * stride_oh + dv[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=q_valid[:, None] & (dv[None, :] < V_DIM),
    )
    if WRITE_LSE:
        # m_i is in log2 units of the scaled score; no visible key (l_i 0) is -inf, which the merge ignores
        lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * _LN2, float("-inf"))
        tl.store(lse_ptr + tok * stride_lt + head, lse, mask=q_valid)


def prefill_config(max_query_len: int, elem_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_N, num_warps, num_stages). 16-bit: 128 queries x 64 keys, the FA2 tile for head dims
    up to 128 on an H100 (the key is split 128 + 64, so the tiles stay that size); fp32 (tests) half of each
    to fit shared memory. Short chunks get a smaller query tile (at least 16 rows: tl.dot)."""
    block_q, block_n = (128, 64) if elem_size <= 2 else (64, 32)
    block_q = max(16, min(block_q, _next_pow2(max_query_len)))
    return block_q, block_n, 8 if block_q >= 128 else 4, 3 if elem_size <= 2 else 2


def mla_prefill_attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    k_pe: torch.Tensor,
    context_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
    query_offsets: torch.Tensor | None = None,
    min_query_len: int = 2,
    block_q: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of the chunks' queries q_nope [T, H, N], q_pe [T, H, P] over their expanded context
    kv [C, H, N + V], k_pe [C, P] (sequence b's context_lens[b] rows from context_start_loc[b]) into out
    [T, H, V]. query_offsets [B]: where query 0 sits relative to the first row (default context_lens -
    q_len: the whole context). lse [T, H] fp32: also each row's log-sum-exp. Rows of sequences with fewer than
    min_query_len tokens are left to the caller. The block/warp/stage knobs are for
    tools/bench_mla_prefill.py; the defaults are prefill_config's."""
    num_heads, nope = q_nope.shape[1], q_nope.shape[2]
    rope, v_dim = q_pe.shape[2], out.shape[2]
    assert kv.shape[2] == nope + v_dim and k_pe.shape[1] == rope
    assert q_nope.stride(2) == 1 and q_pe.stride(2) == 1 and kv.stride(2) == 1 and k_pe.stride(1) == 1
    assert out.stride(2) == 1
    if q_nope.shape[0] == 0:
        return out
    cfg = prefill_config(max_query_len, q_nope.element_size())
    block_q, block_n = block_q or cfg[0], block_n or cfg[1]
    num_warps, num_stages = num_warps or cfg[2], num_stages or cfg[3]
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.stride(1) == 1
    grid = (triton.cdiv(max_query_len, block_q), num_heads, context_lens.shape[0])
    _mla_prefill_kernel[grid](
        q_nope,
        q_pe,
        kv,
        k_pe,
        context_start_loc,
        context_lens,
        context_lens if query_offsets is None else query_offsets,
        query_start_loc,
        out,
        out if lse is None else lse,
        scale * _LOG2E,
        min_query_len,
        q_nope.stride(0),
        q_nope.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        kv.stride(0),
        kv.stride(1),
        k_pe.stride(0),
        out.stride(0),
        out.stride(1),
        0 if lse is None else lse.stride(0),
        NOPE=nope,
        BLOCK_NOPE=max(16, _next_pow2(nope)),
        ROPE=rope,
        BLOCK_ROPE=max(16, _next_pow2(rope)),
        V_DIM=v_dim,
        BLOCK_V=max(16, _next_pow2(v_dim)),
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        HAS_Q_OFF=query_offsets is not None,
        WRITE_LSE=lse is not None,
        UPCAST_DOT=_upcast_dot(q_nope),
        DOT_PRECISION=_dot_precision(q_nope),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
