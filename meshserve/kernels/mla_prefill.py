"""Batched MLA prefill: the expanded form of kernels/mla_ref.mla_prefill_ref for all of a step's prefill chunks
at once, instead of one sequence at a time, in bounded memory.

The step's context is the whole context (cached prefix + new tokens) of every sequence with at least
min_query_len new tokens, concatenated: C = the sum of their seq_lens rows. It is cut into chunks of at most
W rows (the workspace, kernels/mla_prefill_workspace.py; the whole context when there is none), and each
chunk is
  1. gathered  from the paged latent cache through the block tables: one index_select of its [R + P] rows
               (the slot list and the chunk plan are built once per step and shared by every layer:
               meta.step_memo)
  2. expanded  K_nope and V in one GEMM through kv_b_proj's weight: kv [W, H, N + V]
  3. attended  by every query of the sequences it holds, causally (a query sees the chunk's rows up to its
               own position): the Triton kernel (kernels/triton_mla_prefill.py) on a GPU, or the torch
               reference below, which also checks the kernel
  4. merged    with the chunks before it by log-sum-exp (kernels/triton_lse_merge.py, kernels/lse_merge.py)
A context that fits one chunk (every step of up to W tokens of context) runs steps 1-3 once and writes out
directly, without the merge. A chunk may hold pieces of several sequences and a sequence may span several
chunks; a chunk that holds none of a sequence, or only rows past a query's position, gives that query lse
-inf and weight 0 in the merge.

Nothing here syncs with the device: C, the chunk plan and the sequence list come from the metadata's host
lists. Sequences with fewer new tokens (a mixed step's decode rows, and with min_query_len > 2 speculative
verify rows) are neither gathered nor written: the absorbed form serves them (layers/mla_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.kernels.lse_merge import merge_lse_ref
from meshserve.kernels.mla_prefill_workspace import MLAPrefillWorkspace


@dataclass
class PrefillContext:
    """Where the context rows of a step's prefill sequences come from."""

    slots: torch.Tensor  # [C] int64: cache slot of each context token, sequence after sequence
    start_loc: torch.Tensor  # [B + 1] int64: sequence b's rows start at start_loc[b] (none for short ones)
    start_loc_cpu: list[int]  # its host copy

    @property
    def num_tokens(self) -> int:  # C
        return self.start_loc_cpu[-1]


@dataclass
class ChunkPlan:
    """The step's context cut into chunks of at most chunk_tokens rows: for chunk k and sequence b, the rows
    of b in the chunk (ctx_len from ctx_loc, in the chunk's buffer) and where b's query 0 sits relative to
    the first of them (q_off: its causal limit is row q_off + j for query j). [K, B] on the device (rows
    contiguous: one per kernel launch) and on the host."""

    chunk_tokens: int
    num_tokens: int  # C
    ctx_loc: torch.Tensor
    ctx_len: torch.Tensor
    q_off: torch.Tensor
    ctx_loc_cpu: list[list[int]]
    ctx_len_cpu: list[list[int]]
    q_off_cpu: list[list[int]]

    @property
    def num_chunks(self) -> int:
        return len(self.ctx_loc_cpu)

    def rows(self, k: int) -> tuple[int, int]:
        """[begin, end) of chunk k in the step's context."""
        return k * self.chunk_tokens, min((k + 1) * self.chunk_tokens, self.num_tokens)


def prefill_context(meta: AttentionMetadata, block_size: int, min_query_len: int = 2) -> PrefillContext:
    """The step's PrefillContext, built on the device by the first layer that asks (no host sync)."""
    key = ("mla_prefill_context", block_size, min_query_len)
    if key not in meta.step_memo:
        meta.step_memo[key] = _build_prefill_context(meta, block_size, min_query_len)
    return meta.step_memo[key]


def _build_prefill_context(meta: AttentionMetadata, block_size: int, min_query_len: int) -> PrefillContext:
    start_loc_cpu = [0]
    for seq_len, q_len in zip(meta.seq_lens_cpu, meta.query_lens_cpu):
        start_loc_cpu.append(start_loc_cpu[-1] + (seq_len if q_len >= min_query_len else 0))
    num_tokens = start_loc_cpu[-1]
    device = meta.seq_lens.device
    q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
    ctx_lens = torch.where(q_lens >= min_query_len, meta.seq_lens, 0).long()
    start_loc = F.pad(ctx_lens.cumsum(0), (1, 0))
    # output_size from the host count: repeat_interleave would otherwise read it back from the device
    seq = torch.repeat_interleave(
        torch.arange(meta.num_seqs, device=device), ctx_lens, output_size=num_tokens
    )
    pos = torch.arange(num_tokens, device=device) - start_loc[seq]
    blocks = meta.block_tables[seq, pos // block_size].long()
    return PrefillContext(
        slots=blocks * block_size + pos % block_size, start_loc=start_loc, start_loc_cpu=start_loc_cpu
    )


def chunk_plan(meta: AttentionMetadata, ctx: PrefillContext, chunk_tokens: int) -> ChunkPlan:
    """The step's ChunkPlan for ctx, built once per step (meta.step_memo), on the device without a sync."""
    key = ("mla_prefill_chunks", id(ctx), chunk_tokens)
    if key not in meta.step_memo:
        meta.step_memo[key] = _build_chunk_plan(meta, ctx, chunk_tokens)
    return meta.step_memo[key]


def _build_chunk_plan(meta: AttentionMetadata, ctx: PrefillContext, chunk_tokens: int) -> ChunkPlan:
    w, c = chunk_tokens, ctx.num_tokens
    num_chunks = max(1, -(-c // w))
    starts, q_lens = ctx.start_loc_cpu, meta.query_lens_cpu
    loc_cpu, len_cpu, off_cpu = [], [], []
    for k in range(num_chunks):
        k0 = k * w
        los = [min(max(s - k0, 0), w) for s in starts[:-1]]
        his = [min(max(s - k0, 0), w) for s in starts[1:]]
        loc_cpu.append(los)
        len_cpu.append([h - lo for lo, h in zip(los, his)])
        off_cpu.append(
            [(meta.seq_lens_cpu[b] - q_lens[b]) - (k0 + los[b] - starts[b]) for b in range(len(los))]
        )
    # the same on the device, from the device's own lengths (a host-to-device copy would sync)
    k0 = torch.arange(num_chunks, device=ctx.start_loc.device)[:, None] * w
    begin, end = ctx.start_loc[None, :-1], ctx.start_loc[None, 1:]
    lo, hi = (begin - k0).clamp(0, w), (end - k0).clamp(0, w)
    prefix = (meta.seq_lens.long() - (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long())[None]
    return ChunkPlan(
        chunk_tokens=w,
        num_tokens=c,
        ctx_loc=lo.contiguous(),
        ctx_len=(hi - lo).contiguous(),
        q_off=(prefix - (k0 + lo - begin)).contiguous(),
        ctx_loc_cpu=loc_cpu,
        ctx_len_cpu=len_cpu,
        q_off_cpu=off_cpu,
    )


def gather_expand(
    kv_cache: torch.Tensor,
    kv_b_weight: torch.Tensor,
    ctx: PrefillContext,
    num_heads: int,
    dtype: torch.dtype,
    begin: int = 0,
    end: int | None = None,
    workspace: MLAPrefillWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1 and 2 for context rows [begin, end): kv [n, H, N + V] (K_nope then V per head) and the rotary
    keys k_pe [n, P] (a view), in the workspace's buffers when given (else fresh tensors)."""
    end = ctx.num_tokens if end is None else end
    n, rank = end - begin, kv_b_weight.shape[1]
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    slots = ctx.slots[begin:end]
    if workspace is None:
        rows = flat.index_select(0, slots).to(dtype)  # [n, R + P]
        kv = F.linear(rows[:, :rank], kv_b_weight.to(dtype)).view(n, num_heads, -1)
        return kv, rows[:, rank:]
    rows, kv = workspace.latents[:n], workspace.kv[:n]
    if flat.dtype == dtype:
        torch.index_select(flat, 0, slots, out=rows)
    else:  # an fp8 cache: the chunk's rows in the compute dtype
        rows.copy_(flat.index_select(0, slots))
    torch.matmul(rows[:, :rank], kv_b_weight.to(dtype).t(), out=kv.view(n, -1))
    return kv, rows[:, rank:]


def chunk_attention_ref(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    k_pe: torch.Tensor,
    query_start_loc_cpu: list[int],
    ctx_loc_cpu: list[int],
    ctx_len_cpu: list[int],
    q_off_cpu: list[int],
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
    min_query_len: int = 2,
) -> torch.Tensor:
    """Step 3 in torch (triton_mla_prefill.mla_prefill_attention's reference): the rows of sequences with at
    least min_query_len new tokens of out [T, H, V] (and lse [T, H]: natural log, -inf where no row was
    visible, with a zero output) from their queries and one chunk's rows (sequence b's ctx_len_cpu[b] from
    ctx_loc_cpu[b]; its query j sees them up to row q_off_cpu[b] + j). fp32 softmax."""
    nope = q_nope.shape[2]
    starts = query_start_loc_cpu
    for i in range(len(starts) - 1):
        s, e = starts[i], starts[i + 1]
        if e - s < min_query_len:
            continue
        c0, n = ctx_loc_cpu[i], ctx_len_cpu[i]
        ctx = kv[c0 : c0 + n].float()
        k = torch.cat([ctx[..., :nope], k_pe[c0 : c0 + n, None].float().expand(-1, ctx.shape[1], -1)], dim=-1)
        q = torch.cat([q_nope[s:e], q_pe[s:e]], dim=-1).float()
        visible = (
            torch.arange(n, device=q.device) <= (q_off_cpu[i] + torch.arange(e - s, device=q.device))[:, None]
        )
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [H, q]; -inf where nothing is visible
        p = torch.exp(scores - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None])
        o = torch.einsum("hqk,khv->qhv", p, ctx[..., nope:])
        out[s:e] = o.to(out.dtype)
        if lse is not None:
            lse[s:e] = row_lse.transpose(0, 1)
    return out


def mla_prefill(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    kv_b_weight: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    triton: bool,
    workspace: MLAPrefillWorkspace | None = None,
    min_query_len: int = 2,
) -> torch.Tensor:
    """mla_prefill_ref for the sequences of the step with at least min_query_len new tokens, written into
    their rows of out [T, H, V] (the other rows are untouched). triton: the Triton kernels (else the torch
    references). workspace: expand the context chunk by chunk in its buffers (else all of it at once)."""
    num_heads = q_nope.shape[1]
    ctx = prefill_context(meta, kv_cache.shape[2], min_query_len)
    if ctx.num_tokens == 0:
        return out
    plan = chunk_plan(meta, ctx, workspace.chunk_tokens if workspace is not None else ctx.num_tokens)
    if triton:
        from meshserve.kernels.triton_lse_merge import merge_lse
        from meshserve.kernels.triton_mla_prefill import mla_prefill_attention
    last = plan.num_chunks - 1
    if last > 0:
        acc, acc_lse, part, part_lse = workspace.merge_buffers(q_nope.shape[0], out.dtype)
    for k in range(plan.num_chunks):
        kv, k_pe = gather_expand(
            kv_cache, kv_b_weight, ctx, num_heads, q_nope.dtype, *plan.rows(k), workspace
        )
        # one chunk: straight into out; else the first into the fp32 accumulator, the rest beside it
        dst, dst_lse = (out, None) if last == 0 else (acc, acc_lse) if k == 0 else (part, part_lse)
        if triton:
            mla_prefill_attention(
                q_nope, q_pe, kv, k_pe, plan.ctx_loc[k], plan.ctx_len[k], meta.query_start_loc,
                meta.max_query_len, scale, dst, lse=dst_lse, query_offsets=plan.q_off[k],
                min_query_len=min_query_len,
            )  # fmt: skip
        else:
            chunk_attention_ref(
                q_nope, q_pe, kv, k_pe, meta.query_start_loc_cpu, plan.ctx_loc_cpu[k], plan.ctx_len_cpu[k],
                plan.q_off_cpu[k], scale, dst, dst_lse, min_query_len,
            )  # fmt: skip
        if k > 0:  # the last merge writes the step's output
            merged = out if k == last else acc
            if triton:
                merge_lse(merged, acc_lse, acc, acc_lse, part, part_lse, meta.query_start_loc,
                          meta.max_query_len, min_query_len)  # fmt: skip
            else:
                merge_lse_ref(merged, acc_lse, acc, acc_lse, part, part_lse, meta.query_start_loc_cpu,
                              min_query_len)  # fmt: skip
    return out
