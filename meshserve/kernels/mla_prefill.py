"""Batched MLA prefill: the expanded form of kernels/mla_ref.mla_prefill_ref for all of a step's prefill chunks
at once, instead of one sequence at a time.

  1. gather   the context latents (prefix + chunk) of every sequence with more than one new token, read from
              the paged latent cache through the block tables: one index_select of C = sum of their seq_lens
              rows [R + P] (the slot list is built once per step and shared by every layer: meta.step_memo)
  2. expand   K_nope and V of all C tokens in one GEMM through kv_b_proj's weight: kv [C, H, N + V]
  3. attend   causal varlen attention of the chunks' queries over their context rows, q/k head dim N + P and
              v head dim V: the Triton kernel (kernels/triton_mla_prefill.py) on a GPU, or the torch reference
              below (one SDPA per sequence), which also checks the kernel

Nothing here syncs with the device: C and the sequence list come from the host lists of the metadata.
One-token sequences (a mixed step's decode rows) are neither gathered nor written: the absorbed form serves
them (layers/mla_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meshserve.kernels.attention_metadata import AttentionMetadata


@dataclass
class PrefillContext:
    """Where the context rows of a step's prefill sequences come from and go to."""

    slots: torch.Tensor  # [C] int64: cache slot of each context token, sequence after sequence
    start_loc: (
        torch.Tensor
    )  # [B + 1] int64: sequence b's rows start at start_loc[b] (none for one-token ones)
    start_loc_cpu: list[int]  # its host copy

    @property
    def num_tokens(self) -> int:  # C
        return self.start_loc_cpu[-1]


def prefill_context(meta: AttentionMetadata, block_size: int) -> PrefillContext:
    """The step's PrefillContext, built on the device by the first layer that asks (no host sync)."""
    key = ("mla_prefill_context", block_size)
    if key not in meta.step_memo:
        meta.step_memo[key] = _build_prefill_context(meta, block_size)
    return meta.step_memo[key]


def _build_prefill_context(meta: AttentionMetadata, block_size: int) -> PrefillContext:
    starts, start_loc_cpu = meta.query_start_loc_cpu, [0]
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        start_loc_cpu.append(start_loc_cpu[-1] + (seq_len if starts[i + 1] - starts[i] > 1 else 0))
    num_tokens = start_loc_cpu[-1]
    device = meta.seq_lens.device
    q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
    ctx_lens = torch.where(q_lens > 1, meta.seq_lens, 0).long()
    start_loc = F.pad(ctx_lens.cumsum(0), (1, 0))
    # output_size from the host count: repeat_interleave would otherwise read it back from the device
    seq = torch.repeat_interleave(
        torch.arange(len(starts) - 1, device=device), ctx_lens, output_size=num_tokens
    )
    pos = torch.arange(num_tokens, device=device) - start_loc[seq]
    blocks = meta.block_tables[seq, pos // block_size].long()
    return PrefillContext(
        slots=blocks * block_size + pos % block_size, start_loc=start_loc, start_loc_cpu=start_loc_cpu
    )


def gather_expand(
    kv_cache: torch.Tensor, kv_b_weight: torch.Tensor, ctx: PrefillContext, num_heads: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1 and 2: kv [C, H, N + V] (K_nope then V per head) and the rotary keys k_pe [C, P] (a view)."""
    rank = kv_b_weight.shape[1]
    rows = kv_cache.view(-1, kv_cache.shape[-1]).index_select(0, ctx.slots).to(dtype)  # [C, R + P]
    kv = F.linear(rows[:, :rank], kv_b_weight.to(dtype)).view(ctx.num_tokens, num_heads, -1)
    return kv, rows[:, rank:]


def expanded_attention_ref(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    k_pe: torch.Tensor,
    meta: AttentionMetadata,
    start_loc_cpu: list[int],
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Step 3 in torch (triton_mla_prefill.mla_prefill_attention's reference): the rows of multi-token
    sequences of out [T, H, V] from their queries and context rows (sequence b's from start_loc_cpu[b])."""
    nope = q_nope.shape[2]
    starts = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        s, e = starts[i], starts[i + 1]
        if e - s <= 1:
            continue
        c0 = start_loc_cpu[i]
        ctx = kv[c0 : c0 + seq_len]
        k = torch.cat([ctx[..., :nope], k_pe[c0 : c0 + seq_len, None].expand(-1, ctx.shape[1], -1)], dim=-1)
        q = torch.cat([q_nope[s:e], q_pe[s:e]], dim=-1)
        causal = (
            torch.arange(seq_len, device=q.device)
            <= torch.arange(seq_len - (e - s), seq_len, device=q.device)[:, None]
        )
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            ctx[..., nope:].transpose(0, 1),
            attn_mask=causal,
            scale=scale,
        )
        out[s:e] = o.transpose(0, 1).to(out.dtype)
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
) -> torch.Tensor:
    """mla_prefill_ref for the multi-token sequences of the step, written into their rows of out [T, H, V]
    (the other rows are untouched). triton: the Triton attention kernel (else the torch reference)."""
    num_heads = q_nope.shape[1]
    ctx = prefill_context(meta, kv_cache.shape[2])
    if ctx.num_tokens == 0:
        return out
    kv, k_pe = gather_expand(kv_cache, kv_b_weight, ctx, num_heads, q_nope.dtype)
    if triton:
        from meshserve.kernels.triton_mla_prefill import mla_prefill_attention

        return mla_prefill_attention(
            q_nope,
            q_pe,
            kv,
            k_pe,
            ctx.start_loc,
            meta.seq_lens,
            meta.query_start_loc,
            meta.max_query_len,
            scale,
            out,
        )
    return expanded_attention_ref(q_nope, q_pe, kv, k_pe, meta, ctx.start_loc_cpu, scale, out)
