"""The MLA prologue in one Triton kernel: kv_a_layernorm of the latent, the rotary of the shared key and of
every head's query, and the latent write, with the semantics of kernels/mla_ref.mla_rope_latent_ref.

The unfused path runs ~20 kernels per layer for this (two cos/sin gathers, two casts, ~8 elementwise ops and a
cat per rotary, a contiguous copy, the norm, the write): at batch 1, and even at batch 256 where each moves
under 1 MB, they cost launch time, not bytes (~540 launches per DeepSeek-V2-Lite decode step).

``_mla_rope_latent_kernel``: grid (num_tokens,). A program reads its token's position once, the cos/sin row
once, rotates the rotary part of all heads' queries [BLOCK_H, P] into q_pe_out (a separate buffer: rotating in
place would race, an interleaved output element is another thread's input), RMS-normalises the latent
[R] and rotates the shared key [P], and writes [c, k_pe] to the token's cache slot (slot < 0, CUDA-graph
padding, writes nothing). Math in fp32, one rounding at each store.

Rotary layout: cos/sin caches are [max_pos, P] in rotate-half layout (cat(freqs, freqs)), so their first P/2
columns are the frequencies. Pairs are (x[2i], x[2i+1]) when interleaved (DeepSeek V2/V3), (x[i], x[i+P/2])
otherwise; either way the rotated pair lands at (i, i + P/2) (models/deepseek.apply_deepseek_rotary).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mla_rope_latent_kernel(
    q_ptr, kva_ptr, pos_ptr, cos_ptr, sin_ptr, w_ptr, cache_ptr, slot_ptr, qpe_ptr, eps,
    stride_qt, stride_qh, stride_kt, stride_cos, stride_slot, stride_pt, stride_ph,
    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, NOPE: tl.constexpr,
    RANK: tl.constexpr, BLOCK_R: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    INTERLEAVE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + i, mask=i_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cos + i, mask=i_mask, other=0.0).to(tl.float32)
    if INTERLEAVE:
        first = 2 * i
        second = 2 * i + 1
    else:
        first = i
        second = i + HALF

    # every head's query: the rotary part after the NOPE numbers, into q_pe_out [T, H, P]
    h = tl.arange(0, BLOCK_H)
    hm = (h < NUM_HEADS)[:, None] & i_mask[None, :]
    q_row = q_ptr + t * stride_qt + h[:, None] * stride_qh + NOPE
    x1 = tl.load(q_row + first[None, :], mask=hm, other=0.0).to(tl.float32)
    x2 = tl.load(q_row + second[None, :], mask=hm, other=0.0).to(tl.float32)
    o_row = qpe_ptr + t * stride_pt + h[:, None] * stride_ph
    out_ty = qpe_ptr.dtype.element_ty
    tl.store(o_row + i[None, :], (x1 * cos[None, :] - x2 * sin[None, :]).to(out_ty), mask=hm)
    tl.store(o_row + HALF + i[None, :], (x2 * cos[None, :] + x1 * sin[None, :]).to(out_ty), mask=hm)

    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    # the latent: RMSNorm as layers/norm.RMSNorm (normalise in fp32, round to the input dtype, times weight)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < RANK
    kv_row = kva_ptr + t * stride_kt
    x = tl.load(kv_row + r, mask=r_mask, other=0.0)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / RANK + eps)
    w = tl.load(w_ptr + r, mask=r_mask, other=0.0).to(tl.float32)
    c = (xf * inv).to(x.dtype).to(tl.float32) * w
    k1 = tl.load(kv_row + RANK + first, mask=i_mask, other=0.0).to(tl.float32)
    k2 = tl.load(kv_row + RANK + second, mask=i_mask, other=0.0).to(tl.float32)
    row = cache_ptr + slot.to(tl.int64) * stride_slot
    cache_ty = cache_ptr.dtype.element_ty
    tl.store(row + r, c.to(cache_ty), mask=r_mask)
    tl.store(row + RANK + i, (k1 * cos - k2 * sin).to(cache_ty), mask=i_mask)
    tl.store(row + RANK + HALF + i, (k2 * cos + k1 * sin).to(cache_ty), mask=i_mask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def mla_rope_latent(q: torch.Tensor, kv_a: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                    sin_cache: torch.Tensor, norm_weight: torch.Tensor, eps: float, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, interleave: bool) -> torch.Tensor:
    """q [T, H, N + P] (the q projection, viewed per head), kv_a [T, R + P] (kv_a_proj_with_mqa's output):
    writes [RMSNorm(c), rotary(k_pe)] to kv_cache [1, blocks, block_size, 1, R + P] at slot_mapping and
    returns the rotated q_pe [T, H, P] (contiguous). Last dims must be contiguous; no host sync."""
    num_tokens, num_heads, qk_dim = q.shape
    rope = kv_cache.shape[-1] - norm_weight.shape[0]
    rank, nope = norm_weight.shape[0], qk_dim - rope
    assert rope % 2 == 0 and kv_a.shape[1] == rank + rope and cos_cache.shape[-1] == rope
    assert q.stride(2) == 1 and kv_a.stride(1) == 1 and kv_cache.is_contiguous() and cos_cache.is_contiguous()
    q_pe = q.new_empty(num_tokens, num_heads, rope)
    if num_tokens == 0:
        return q_pe
    half = rope // 2
    _mla_rope_latent_kernel[(num_tokens,)](
        q, kv_a, positions, cos_cache, sin_cache, norm_weight, kv_cache, slot_mapping, q_pe, float(eps),
        q.stride(0), q.stride(1), kv_a.stride(0), cos_cache.stride(0), kv_cache.stride(2),
        q_pe.stride(0), q_pe.stride(1),
        NUM_HEADS=num_heads, BLOCK_H=_next_pow2(num_heads), NOPE=nope, RANK=rank, BLOCK_R=_next_pow2(rank),
        HALF=half, BLOCK_HALF=_next_pow2(half), INTERLEAVE=bool(interleave),
        num_warps=4 if num_heads * rope <= 4096 else 8,
    )
    return q_pe
