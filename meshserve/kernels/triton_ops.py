"""Fused Triton kernels for the small per-token ops, each beside its torch reference (same signature).

* rms_norm(x, weight, eps, residual=None): RMSNorm with the residual add fused, exactly the semantics of
  meshserve.layers.norm.RMSNorm (fp32 statistics, `weight * x_normed.to(x.dtype)`, the result in the
  promoted dtype of weight and x); with a residual returns (normed(x + residual), x + residual).
* silu_and_mul(x): [..., 2d] -> silu(x[..., :d]) * x[..., d:], as meshserve.layers.activation.SiluAndMul.
* apply_rotary(positions, q, k, cos_cache, sin_cache): rotate-half RoPE with cos/sin rows gathered by
  position, as meshserve.layers.rotary.RotaryEmbedding.forward; returns new (q, k) in their dtypes.

The kernels reproduce the reference's intermediate roundings to the input dtype, so 16-bit results match
the references up to the last-bit effects of fp32 reduction order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def _np2(n: int) -> int:
    return triton.next_power_of_2(int(n))


# ----------------------------------------------------------------------------------------------------------
# RMSNorm (+ residual)
# ----------------------------------------------------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if residual is not None:
        x = x + residual
        residual = x
    orig_dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(orig_dtype)
    return out if residual is None else (out, residual)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                     stride_x, stride_r, stride_o, stride_ro,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # x + residual in x's dtype
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / n_cols
    normed = (xf * (1.0 / tl.sqrt(var + eps))).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Same as rms_norm_ref. x [..., H] (last dim contiguous); returns out, or (out, x + residual)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    out2 = out.view(-1, hidden)
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        ro2 = res_out.view(-1, hidden)
    else:
        r2 = ro2 = x2
        res_out = None
    if rows > 0:
        block = _np2(hidden)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out2, ro2, hidden, float(eps),
            x2.stride(0), r2.stride(0), out2.stride(0), ro2.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    return out if residual is None else (out, res_out)


# ----------------------------------------------------------------------------------------------------------
# SiLU and mul
# ----------------------------------------------------------------------------------------------------------
def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)  # silu rounds first
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Same as silu_and_mul_ref: [..., 2d] -> [..., d]."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, d)
    if x2.shape[0] > 0 and d > 0:
        block = min(1024, _np2(d))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out2, d, x2.stride(0), out2.stride(0), BLOCK=block, num_warps=4 if block >= 512 else 1)
    return out


# ----------------------------------------------------------------------------------------------------------
# rotary embedding
# ----------------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor):
    """positions [T]; q [T, H, D]; k [T, Hkv, D]; cos/sin caches [max_pos, D] -> rotated (q, k)."""
    cos = cos_cache[positions].unsqueeze(1).to(q.dtype)
    sin = sin_cache[positions].unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@triton.jit
def _rope_one(src_ptr, dst_ptr, t, stride_t, stride_h, dst_stride_t, dst_stride_h, c1, c2, s1, s2,
              NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < NUM_HEADS) & (j[None, :] < HALF)
    src = src_ptr + t * stride_t + h[:, None] * stride_h + j[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dt = dst_ptr.dtype.element_ty
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    # q * cos + rotate_half(q) * sin, rounded to the input dtype after each op like the torch reference
    o1 = (x1f * c1).to(dt).to(tl.float32) + (-x2f * s1).to(dt).to(tl.float32)
    o2 = (x2f * c2).to(dt).to(tl.float32) + (x1f * s2).to(dt).to(tl.float32)
    dst = dst_ptr + t * dst_stride_t + h[:, None] * dst_stride_h + j[None, :]
    tl.store(dst, o1.to(dt), mask=mask)
    tl.store(dst + HALF, o2.to(dt), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                   stride_cos, stride_sin,
                   NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    jm = j < HALF
    dt = qo_ptr.dtype.element_ty
    # cos/sin rows cast to q's dtype, as the reference does
    c1 = tl.load(cos_ptr + pos * stride_cos + j, mask=jm, other=0.0).to(dt).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + pos * stride_cos + HALF + j, mask=jm, other=0.0).to(dt).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + pos * stride_sin + j, mask=jm, other=0.0).to(dt).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + pos * stride_sin + HALF + j, mask=jm, other=0.0).to(dt).to(tl.float32)[None, :]
    _rope_one(q_ptr, qo_ptr, t, stride_qt, stride_qh, stride_qot, stride_qoh, c1, c2, s1, s2,
              NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    _rope_one(k_ptr, ko_ptr, t, stride_kt, stride_kh, stride_kot, stride_koh, c1, c2, s1, s2,
              NUM_K_HEADS, HALF, BLOCK_KH, BLOCK_HALF)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                 sin_cache: torch.Tensor):
    """Same as apply_rotary_ref (q and k may be strided views; the last dim must be contiguous)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if head_dim % 2 or cos_cache.shape[-1] != head_dim:
        raise ValueError("rotary needs an even head_dim equal to the cos/sin cache width")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos_cache = cos_cache if cos_cache.stride(-1) == 1 else cos_cache.contiguous()
    sin_cache = sin_cache if sin_cache.stride(-1) == 1 else sin_cache.contiguous()
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((num_tokens, num_k_heads, head_dim), dtype=k.dtype, device=k.device)
    if num_tokens > 0:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            positions, q, k, q_out, k_out, cos_cache, sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos_cache.stride(0), sin_cache.stride(0),
            NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HALF=half,
            BLOCK_QH=_np2(num_q_heads), BLOCK_KH=_np2(num_k_heads), BLOCK_HALF=_np2(half),
            num_warps=4 if num_q_heads * head_dim >= 2048 else 2,
        )
    return q_out, k_out
