"""Fused Triton kernels for the small per-token ops, each beside its torch reference (same signature).

* rms_norm(x, weight, eps, residual=None): RMSNorm with the residual add fused, exactly the semantics of
  the RMSNorm layer (layers/norm.py: fp32 statistics, `weight * x_normed.to(x.dtype)`, the result in the
  promoted dtype of weight and x); with a residual returns (normed(x + residual), x + residual).
* silu_and_mul(x): [..., 2d] -> silu(x[..., :d]) * x[..., d:], as the SiluAndMul layer (layers/activation.py).
* apply_rotary(positions, q, k, cos_cache, sin_cache): rotate-half RoPE with cos/sin rows gathered by
  position, as RotaryEmbedding.forward (layers/rotary.py); returns new (q, k) in their dtypes.
* qkv_rope_cache(qkv, positions, cos, sin, q_norm_w, k_norm_w, eps, kv_cache, slot_mapping, H, Hkv,
  k_scale=1.0, v_scale=1.0): the attention layer's prologue in one kernel per token: split the fused QKV row,
  RMSNorm q and k per head (Qwen3), rotate both, write k and v to their cache slots, return q. Replaces up to
  five kernels and the copies of the strided q/k views. An fp8 cache gets K / k_scale and V / v_scale,
  saturated at +-448 (quant_ref.to_fp8, as the reshape-and-cache write), so it takes one kernel too.

With PDL on (kernels/pdl.py) the norm, SiLU and prologue kernels wait on the previous kernel (griddepcontrol)
after their weight loads and before their first activation load; off, they compile as before.

The kernels reproduce the reference's intermediate roundings to the input dtype, so 16-bit results match
the references up to the last-bit effects of fp32 reduction order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from meshserve.kernels.kv_layout import v_transposed
from meshserve.kernels.pdl import gdc_kwargs
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait
from meshserve.kernels.triton_kv_layout import v_offset


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
def rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, cols, mask, n_cols, eps, stride_x, stride_r, stride_ro,
                 HAS_RESIDUAL: tl.constexpr, USE_GDC: tl.constexpr):
    """One row of RMSNorm (+ residual add, the sum written to res_out), in fp32 before its final rounding:
    the body of _rms_norm_kernel and of triton_fp8_fused's norm + quantization kernel."""
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: safe before the PDL wait
    gdc_wait(USE_GDC)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
    gdc_trigger_late(USE_GDC)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # x + residual in x's dtype
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / n_cols
    normed = (xf * (1.0 / tl.sqrt(var + eps))).to(x_ptr.dtype.element_ty)
    return w.to(tl.float32) * normed.to(tl.float32)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                     stride_x, stride_r, stride_o, stride_ro,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    y = rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, cols, mask, n_cols, eps, stride_x, stride_r,
                     stride_ro, HAS_RESIDUAL, USE_GDC)
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
            **gdc_kwargs(x2, programs=rows, num_warps=min(16, max(1, block // 256))),
        )
    return out if residual is None else (out, res_out)


# ----------------------------------------------------------------------------------------------------------
# SiLU and mul
# ----------------------------------------------------------------------------------------------------------
def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def silu_mul(gate, up, dt: tl.constexpr):
    """silu(gate) * up in dt from fp32 gate and up, rounded as silu_and_mul_ref: SiLU to dt first, then the
    product (every fused kernel that ends in or starts from SiLU-and-mul uses this, so their bits agree)."""
    act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    return (act * up).to(dt)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_o, BLOCK: tl.constexpr,
                         USE_GDC: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gdc_wait(USE_GDC)
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    gdc_trigger_late(USE_GDC)
    tl.store(out_ptr + row * stride_o + cols, silu_mul(gate, up, out_ptr.dtype.element_ty), mask=mask)


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
        grid, warps = (x2.shape[0], triton.cdiv(d, block)), 4 if block >= 512 else 1
        _silu_and_mul_kernel[grid](
            x2, out2, d, x2.stride(0), out2.stride(0), BLOCK=block, num_warps=warps,
            **gdc_kwargs(x2, programs=grid[0] * grid[1], num_warps=warps))
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


# ----------------------------------------------------------------------------------------------------------
# q/k RMSNorm (Qwen3) + rotary + KV-cache write, fused
# ----------------------------------------------------------------------------------------------------------
def qkv_rope_cache_ref(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                       sin_cache: torch.Tensor, q_norm_weight: torch.Tensor | None,
                       k_norm_weight: torch.Tensor | None, eps: float, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, k_scale: float = 1.0,
                       v_scale: float = 1.0) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) D] -> rotated q [T, H, D]; k (normed, rotated) and v go to their cache slots.

    The composition the layers do one op at a time: split, per-head RMSNorm of q and k (when weights are
    given), rotary, write_kv. kv_cache is [2, num_blocks, block_size, Hkv, D]; slots < 0 write nothing; an
    fp8 cache holds K / k_scale and V / v_scale (write_kv_ref).
    """
    from meshserve.kernels.attention_ref import write_kv_ref

    head_dim = kv_cache.shape[-1]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.reshape(-1, num_heads, head_dim)
    k = k.reshape(-1, num_kv_heads, head_dim)
    v = v.reshape(-1, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q, k = rms_norm_ref(q, q_norm_weight, eps), rms_norm_ref(k, k_norm_weight, eps)
    q, k = apply_rotary_ref(positions, q, k, cos_cache, sin_cache)
    keep = slot_mapping >= 0
    write_kv_ref(k[keep], v[keep], kv_cache, slot_mapping[keep], k_scale, v_scale)
    return q


@triton.jit
def _norm_rope_heads(src, t, stride_t, head0, w_ptr, eps, c1, c2, s1, s2,
                     NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, HAS_NORM: tl.constexpr, dt: tl.constexpr):
    """Load heads [head0, head0 + NUM_HEADS) of token t as two halves, RMSNorm each head (optional), rotate;
    every intermediate rounded to dt like the unfused kernels."""
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < NUM_HEADS) & (j[None, :] < HALF)
    ptr = src + t * stride_t + (head0 + h[:, None]) * (2 * HALF) + j[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        var = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF)
        inv = (1.0 / tl.sqrt(var + eps))[:, None]
        jm = j < HALF
        w1 = tl.load(w_ptr + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (x1 * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (w2 * (x2 * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt), h, j, mask


@triton.jit
def _to_cache(x, scale, cdt: tl.constexpr, KV_FP8: tl.constexpr):
    """x in the cache's element type: an fp8 cache holds x / scale saturated at +-448 (quant_ref.to_fp8: IEEE
    division, round to nearest even), a 16-bit cache x itself."""
    if KV_FP8:
        return tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -448.0, 448.0).to(cdt)
    return x.to(cdt)


@triton.jit
def _rope_halves(cos_ptr, sin_ptr, pos, stride_cos, stride_sin, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 dt: tl.constexpr):
    """The cos / sin rows of position pos as (c1, c2, s1, s2) [1, BLOCK_HALF]: first and second halves, cast to
    the activations' dtype first (the rounding the torch reference makes), then fp32."""
    j = tl.arange(0, BLOCK_HALF)
    jm = j < HALF
    c1 = tl.load(cos_ptr + pos * stride_cos + j, mask=jm, other=0.0).to(dt).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + pos * stride_cos + HALF + j, mask=jm, other=0.0).to(dt).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + pos * stride_sin + j, mask=jm, other=0.0).to(dt).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + pos * stride_sin + HALF + j, mask=jm, other=0.0).to(dt).to(tl.float32)[None, :]
    return c1, c2, s1, s2


@triton.jit
def _qkv_rope_cache_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_out_ptr, cache_ptr, slot_ptr,
                           eps, k_scale, v_scale, stride_t, stride_qo_t, stride_cos, stride_sin,
                           stride_ckv, stride_cb, stride_cs, stride_ch,
                           NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                           BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr, HAS_NORM: tl.constexpr, KV_FP8: tl.constexpr = False,
                           USE_GDC: tl.constexpr = False, V_T: tl.constexpr = False):
    t = tl.program_id(0).to(tl.int64)
    gdc_wait(USE_GDC)  # qkv is the projection's output; positions and slots may be written in the graph too
    pos = tl.load(pos_ptr + t).to(tl.int64)
    dt = q_out_ptr.dtype.element_ty
    c1, c2, s1, s2 = _rope_halves(cos_ptr, sin_ptr, pos, stride_cos, stride_sin, HALF, BLOCK_HALF, dt)

    q1, q2, h, jj, mask = _norm_rope_heads(qkv_ptr, t, stride_t, 0, qw_ptr, eps, c1, c2, s1, s2,
                                           NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF, HAS_NORM, dt)
    q_dst = q_out_ptr + t * stride_qo_t + h[:, None] * (2 * HALF) + jj[None, :]
    tl.store(q_dst, q1, mask=mask)
    tl.store(q_dst + HALF, q2, mask=mask)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # CUDA-graph padding rows (slot -1) write nothing
        k1, k2, kh, kj, kmask = _norm_rope_heads(qkv_ptr, t, stride_t, NUM_Q_HEADS, kw_ptr, eps, c1, c2, s1,
                                                 s2, NUM_KV_HEADS, HALF, BLOCK_KH, BLOCK_HALF, HAS_NORM, dt)
        cdt = cache_ptr.dtype.element_ty
        dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs \
            + kh[:, None] * stride_ch + kj[None, :]
        tl.store(dst, _to_cache(k1, k_scale, cdt, KV_FP8), mask=kmask)
        tl.store(dst + HALF, _to_cache(k2, k_scale, cdt, KV_FP8), mask=kmask)
        v_src = qkv_ptr + t * stride_t + (NUM_Q_HEADS + NUM_KV_HEADS + kh[:, None]) * (2 * HALF) + kj[None, :]
        blk, off = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        for j in tl.static_range(2):  # the two rotary halves' features (the cache's feature stride is 1)
            v_dst = cache_ptr + v_offset(blk, off, kh[:, None], kj[None, :] + j * HALF, stride_ckv, stride_cb,
                                         stride_cs, stride_ch, 1, BLOCK_SIZE, V_T)
            tl.store(v_dst, _to_cache(tl.load(v_src + j * HALF, mask=kmask), v_scale, cdt, KV_FP8), mask=kmask)
    gdc_trigger_late(USE_GDC)  # the loads run to the end here: the exit's trigger, made explicit


def qkv_rope_cache(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                   q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                   kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                   num_kv_heads: int, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Same as qkv_rope_cache_ref, in one kernel per token (qkv rows contiguous; head_dim even)."""
    num_tokens = qkv.shape[0]
    head_dim = kv_cache.shape[-1]
    if head_dim % 2 or cos_cache.shape[-1] != head_dim:
        raise ValueError("rotary needs an even head_dim equal to the cos/sin cache width")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q_out = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if num_tokens:
        half = head_dim // 2
        has_norm = q_norm_weight is not None
        _qkv_rope_cache_kernel[(num_tokens,)](
            qkv, positions, cos_cache, sin_cache, q_norm_weight if has_norm else qkv,
            k_norm_weight if has_norm else qkv, q_out, kv_cache, slot_mapping, float(eps), float(k_scale),
            float(v_scale), qkv.stride(0), q_out.stride(0), cos_cache.stride(0), sin_cache.stride(0),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=half,
            BLOCK_QH=_np2(num_heads), BLOCK_KH=_np2(num_kv_heads), BLOCK_HALF=_np2(half),
            BLOCK_SIZE=kv_cache.shape[2], HAS_NORM=has_norm, KV_FP8=kv_cache.dtype == torch.float8_e4m3fn,
            V_T=v_transposed(kv_cache),
            num_warps=4 if num_heads * head_dim >= 2048 else 2,
            **gdc_kwargs(qkv, programs=num_tokens, num_warps=4 if num_heads * head_dim >= 2048 else 2),
        )
    return q_out
