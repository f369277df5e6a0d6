"""Triton log-sum-exp merge of two partial attention results (kernels/lse_merge.merge_lse_ref's semantics):
the pieces of an MLA prefill context attended one workspace at a time (kernels/mla_prefill.py).

``_merge_lse_kernel``: grid (cdiv(max_query_len, BLOCK_T), H, B), one program per (BLOCK_T query rows of
sequence b, head): a [BLOCK_T, V] tile in fp32, memory-bound and small next to the attention it merges. Sequences with fewer than
min_query_len new tokens are skipped (their rows are the absorbed path's). No host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.triton_attention import _next_pow2


@triton.jit(do_not_specialize=["qsl_ptr"])  # per-step metadata, scalar loads (triton_mla_prefill)
def _merge_lse_kernel(
    out_ptr,
    out_lse_ptr,
    a_ptr,
    a_lse_ptr,
    b_ptr,
    b_lse_ptr,
    qsl_ptr,
    min_query_len,
    stride_ot,
    stride_oh,
    stride_olt,
    stride_at,
    stride_ah,
    stride_alt,
    stride_bt,
    stride_bh,
    stride_blt,
    V_DIM: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    qt = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if qt * BLOCK_T >= q_len:
        return
    if q_len < min_query_len:
        return
    qi = qt * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = qi < q_len
    tok = (q_start + qi).to(tl.int64)
    la = tl.load(a_lse_ptr + tok * stride_alt + head, mask=row_ok, other=float("-inf"))
    lb = tl.load(b_lse_ptr + tok * stride_blt + head, mask=row_ok, other=float("-inf"))
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)  # both sides empty: weights 0, not nan
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    total = wa + wb
    dv = tl.arange(0, BLOCK_V)
    mask = row_ok[:, None] & (dv[None, :] < V_DIM)
    va = tl.load(a_ptr + tok[:, None] * stride_at + head * stride_ah + dv[None, :], mask=mask, other=0.0)
    vb = tl.load(b_ptr + tok[:, None] * stride_bt + head * stride_bh + dv[None, :], mask=mask, other=0.0)
    o = (va.to(tl.float32) * wa[:, None] + vb.to(tl.float32) * wb[:, None]) / tl.where(total > 0, total, 1.0)[
        :, None
    ]
    o_ptrs = out_ptr + tok[:, None] * stride_ot + head * stride_oh + dv[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=mask)
    lse = tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(out_lse_ptr + tok * stride_olt + head, lse, mask=row_ok)


def merge_tiles(max_query_len: int, v_dim: int) -> tuple[int, int]:
    """(BLOCK_V, BLOCK_T) of a merge: the value row padded to a power of two, and rows enough for ~4k fp32
    numbers a program (fewer for short queries)."""
    block_v = _next_pow2(v_dim)
    return block_v, max(1, min(_next_pow2(max_query_len), 4096 // block_v))


def merge_lse(
    out: torch.Tensor,
    out_lse: torch.Tensor,
    a: torch.Tensor,
    a_lse: torch.Tensor,
    b: torch.Tensor,
    b_lse: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    min_query_len: int = 2,
) -> None:
    """merge_lse_ref on the device: out [T, H, V], out_lse [T, H] fp32 (may alias a, a_lse) <- the merge of
    (a, a_lse) and (b, b_lse) on the rows of sequences with at least min_query_len new tokens."""
    num_tokens, num_heads, v_dim = out.shape
    if num_tokens == 0 or max_query_len < min_query_len:
        return
    for t in (out, a, b):
        assert t.stride(2) == 1
    for t in (out_lse, a_lse, b_lse):
        assert t.dtype == torch.float32 and t.stride(1) == 1
    block_v, block_t = merge_tiles(max_query_len, v_dim)
    grid = (triton.cdiv(max_query_len, block_t), num_heads, query_start_loc.shape[0] - 1)
    _merge_lse_kernel[grid](
        out,
        out_lse,
        a,
        a_lse,
        b,
        b_lse,
        query_start_loc,
        min_query_len,
        out.stride(0),
        out.stride(1),
        out_lse.stride(0),
        a.stride(0),
        a.stride(1),
        a_lse.stride(0),
        b.stride(0),
        b.stride(1),
        b_lse.stride(0),
        V_DIM=v_dim,
        BLOCK_V=block_v,
        BLOCK_T=block_t,
        num_warps=4,
    )
