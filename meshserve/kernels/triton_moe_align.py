"""Sorting the (token, slot) pairs by expert for the grouped GEMM in three Triton launches (issue 24).

triton_moe.align_by_expert does it in torch ops of static shape (about 30 launches with the argsort, each a
few microseconds of a graph at decode; 48 MoE layers pay it every step). The same outputs here:
  count     grid over chunks of pairs: each chunk's per-expert counts (a one-hot column sum), added to
            counts[E] with one atomic per expert
  plan      one program: each expert's run padded to BLOCK_M, their starts (a cumsum), the padded total,
            every block's expert, each expert's write cursor at its start, and the padding value in every row
  scatter   grid over chunks: a pair's row is its expert's cursor, advanced by one atomic per (chunk, expert)
            by the chunk's count, plus the pair's rank among the chunk's pairs of that expert
Rows are grouped by expert as triton_moe.align_by_expert groups them; within an expert the chunks may land in
any order (the atomics race), which changes nothing: every row of a GEMM tile is computed on its own.
Pairs with expert id -1 (another expert-parallel rank's) are left out. Static shapes, no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 64  # pairs per program of count / scatter: one-hot tiles of CHUNK x experts int32


@triton.jit
def _onehot(ids_ptr, chunk, num_pairs, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
    experts = tl.arange(0, BLOCK_E)
    return offs, ids, (ids[:, None] == experts[None, :]).to(tl.int32)


@triton.jit(do_not_specialize=["num_pairs"])  # per-step counts (triton_unified_attention)
def _count_kernel(ids_ptr, counts_ptr, num_pairs, num_experts, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    _, _, onehot = _onehot(ids_ptr, tl.program_id(0), num_pairs, CHUNK, BLOCK_E)
    experts = tl.arange(0, BLOCK_E)
    tl.atomic_add(counts_ptr + experts, tl.sum(onehot, 0), mask=experts < num_experts)


@triton.jit(do_not_specialize=["num_pairs", "num_rows_padded"])  # per-step counts (triton_unified_attention)
def _plan_kernel(
    counts_ptr,
    cursor_ptr,
    sorted_rows_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_pairs,
    num_experts,
    num_rows_padded,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    FILL: tl.constexpr,
    FILL_ROWS: tl.constexpr,
):
    experts = tl.arange(0, BLOCK_E)
    emask = experts < num_experts
    counts = tl.load(counts_ptr + experts, mask=emask, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    tl.store(cursor_ptr + experts, ends - padded, mask=emask)
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    # block b's expert: how many experts' runs end at or before its first row (clamped: blocks past the
    # padded total are skipped by the GEMM)
    ends = tl.where(emask, ends, 2147483647)
    for b0 in range(0, num_rows_padded // BLOCK_M, FILL):
        blocks = b0 + tl.arange(0, FILL)
        owner = tl.sum((ends[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), 1)
        tl.store(
            block_expert_ptr + blocks,
            tl.minimum(owner, num_experts - 1),
            mask=blocks < num_rows_padded // BLOCK_M,
        )
    for r0 in range(0, num_rows_padded, FILL_ROWS):
        rows = r0 + tl.arange(0, FILL_ROWS)
        tl.store(
            sorted_rows_ptr + rows, tl.full([FILL_ROWS], 0, tl.int32) + num_pairs, mask=rows < num_rows_padded
        )


@triton.jit(do_not_specialize=["num_pairs"])  # per-step counts (triton_unified_attention)
def _scatter_kernel(
    ids_ptr, cursor_ptr, sorted_rows_ptr, num_pairs, num_experts, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr
):
    offs, ids, onehot = _onehot(ids_ptr, tl.program_id(0), num_pairs, CHUNK, BLOCK_E)
    experts = tl.arange(0, BLOCK_E)
    base = tl.atomic_add(cursor_ptr + experts, tl.sum(onehot, 0), mask=experts < num_experts)
    rank = tl.sum((tl.cumsum(onehot, 0) - onehot) * onehot, 1)  # earlier pairs of its expert in the chunk
    row = tl.sum(onehot * base[None, :], 1) + rank
    tl.store(sorted_rows_ptr + row, offs.to(tl.int32), mask=(ids >= 0) & (offs < num_pairs))


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """triton_moe.align_by_expert's outputs (sorted_rows [R] int32, block_expert [R / block_m] int32,
    num_padded [1] int32), R = the same static bound on the padded rows."""
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    pairs = ids.numel()
    rows_padded = triton.cdiv(pairs + num_experts * (block_m - 1), block_m) * block_m
    block_e = triton.next_power_of_2(num_experts)
    work = torch.zeros(2 * num_experts + 1, dtype=torch.int32, device=ids.device)  # counts, cursors, total
    counts, cursor, num_padded = (
        work[:num_experts],
        work[num_experts : 2 * num_experts],
        work[2 * num_experts :],
    )
    sorted_rows = torch.empty(rows_padded, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(rows_padded // block_m, dtype=torch.int32, device=ids.device)
    chunks = triton.cdiv(pairs, CHUNK)
    warps = 4 if block_e <= 128 else 8
    _count_kernel[(chunks,)](ids, counts, pairs, num_experts, CHUNK=CHUNK, BLOCK_E=block_e, num_warps=warps)
    _plan_kernel[(1,)](
        counts,
        cursor,
        sorted_rows,
        block_expert,
        num_padded,
        pairs,
        num_experts,
        rows_padded,
        BLOCK_M=block_m,
        BLOCK_E=block_e,
        FILL=64,
        FILL_ROWS=1024,
        num_warps=4,
    )
    _scatter_kernel[(chunks,)](
        ids, cursor, sorted_rows, pairs, num_experts, CHUNK=CHUNK, BLOCK_E=block_e, num_warps=warps
    )
    return sorted_rows, block_expert, num_padded
