"""Plain torch multi-head latent attention (DeepSeek MLA) over the paged latent cache: the CPU path and the
reference for kernels/triton_mla.py.

Cache layout (per layer): [1, num_blocks, block_size, 1, R + P]: per token the normalised KV latent c (R =
kv_lora_rank) followed by the rotated shared rotary key k_pe (P = qk_rope_head_dim); one row for all heads,
instead of K and V per head. With W_UK [H, N, R] and W_UV [H, V, R] the per-head slices of kv_b_proj, head h
of a token has key [W_UK[h] c, k_pe] and value W_UV[h] c. Two equal ways to attend:

  expanded (prefill)   rebuild K and V of the context from the latents, then ordinary attention
  absorbed (decode)    q_lat = W_UK[h]^T q_nope: score = q_lat . c + q_pe . k_pe, o_lat = sum_j p_j c_j, and
                       out = W_UV[h] o_lat; the kernel reads only the R + P numbers per context token

Query j of a sequence with context length L (after this step) and q_len new tokens sits at position
L - q_len + j and attends keys 0 .. that position (AttentionMetadata's rules).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meshserve.kernels.attention_metadata import AttentionMetadata


def write_latent_ref(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """Scatter this step's latents [T, R] and rotary keys [T, P] into their slots; slot < 0 writes nothing."""
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    rows = torch.cat([kv_c, k_pe], dim=-1).to(kv_cache.dtype)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        rows, slot_mapping = rows[keep], slot_mapping[keep]
    flat.index_copy_(0, slot_mapping, rows)


def mla_rope_latent_ref(q: torch.Tensor, kv_a: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                        sin_cache: torch.Tensor, norm_weight: torch.Tensor, eps: float, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, interleave: bool) -> torch.Tensor:
    """The MLA prologue (kernels/triton_mla_rope.py): q [T, H, N + P], kv_a [T, R + P] -> the rotated q_pe
    [T, H, P]; writes [RMSNorm(c) * weight, rotated k_pe] to the cache. cos/sin [max_pos, P] rotate-half layout
    (first P/2 columns the frequencies); interleaved pairs (x[2i], x[2i+1]) land at (i, i + P/2). fp32 math."""
    rank = norm_weight.shape[0]
    rope = kv_a.shape[1] - rank
    half = rope // 2
    cos, sin = cos_cache[positions, :half].float(), sin_cache[positions, :half].float()

    def rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else (x[..., :half], x[..., half:])
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    q_pe = rotate(q[..., q.shape[-1] - rope:], cos[:, None], sin[:, None]).to(q.dtype)
    x = kv_a[:, :rank]
    xf = x.float()
    c = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).float() * norm_weight.float()
    write_latent_ref(c, rotate(kv_a[:, rank:], cos, sin), kv_cache, slot_mapping)
    return q_pe


def gather_latent_ref(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The cached rows [seq_len, R + P] of one sequence, read through its block table."""
    block_size = kv_cache.shape[2]
    blocks = block_table[: -(-seq_len // block_size)].long()
    return kv_cache[0, blocks].flatten(0, 1)[:seq_len, 0]


def _causal_mask(q_len: int, seq_len: int, device) -> torch.Tensor:
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device).unsqueeze(1)
    return torch.arange(seq_len, device=device).unsqueeze(0) <= q_pos


def mla_decode_ref(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                   scale: float) -> torch.Tensor:
    """The absorbed form: q_lat [T, H, R] (W_UK already applied), q_pe [T, H, P] -> o_lat [T, H, R], the
    softmax-weighted sum of the context's latents (W_UV still to apply). Any q_len per sequence (causal);
    scores and softmax in float32."""
    rank = q_lat.shape[-1]
    out = torch.zeros_like(q_lat)
    starts = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        s, e = starts[i], starts[i + 1]
        if e == s or seq_len == 0:
            continue
        rows = gather_latent_ref(kv_cache, meta.block_tables[i], seq_len).float()  # [L, R + P]
        c, pe = rows[:, :rank], rows[:, rank:]
        scores = (torch.einsum("qhr,lr->hql", q_lat[s:e].float(), c)
                  + torch.einsum("qhp,lp->hql", q_pe[s:e].float(), pe)) * scale
        scores = scores.masked_fill(~_causal_mask(e - s, seq_len, q_lat.device), float("-inf"))
        out[s:e] = torch.einsum("hql,lr->qhr", scores.softmax(dim=-1), c).to(out.dtype)
    return out


def mla_prefill_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, kv_b_weight: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The expanded form: q_nope [T, H, N], q_pe [T, H, P], kv_b_weight [H * (N + V), R] (this rank's heads)
    -> [T, H, V]. Each sequence's K and V are rebuilt from its cached latents (what HF computes)."""
    num_heads, nope = q_nope.shape[1], q_nope.shape[2]
    rank = kv_b_weight.shape[1]
    v_dim = kv_b_weight.shape[0] // num_heads - nope
    out = q_nope.new_zeros(q_nope.shape[0], num_heads, v_dim)
    query = torch.cat([q_nope, q_pe], dim=-1)
    starts = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        s, e = starts[i], starts[i + 1]
        if e == s or seq_len == 0:
            continue
        rows = gather_latent_ref(kv_cache, meta.block_tables[i], seq_len).to(query.dtype)
        kv = F.linear(rows[:, :rank], kv_b_weight).view(seq_len, num_heads, nope + v_dim)
        pe = rows[:, None, rank:].expand(seq_len, num_heads, rows.shape[1] - rank)
        k = torch.cat([kv[..., :nope], pe], dim=-1)
        v = kv[..., nope:]
        o = F.scaled_dot_product_attention(query[s:e].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=_causal_mask(e - s, seq_len, query.device), scale=scale)
        out[s:e] = o.transpose(0, 1)
    return out
