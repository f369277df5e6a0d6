"""Batch-1 projection (GEMV) in Triton: y[1, N] = x[1, K] @ W[N, K]^T (+ bias), 16-bit weights.

A decode step at batch 1 is a chain of weight reads; cuBLAS picks GEMM tiles that leave small projections
at 30-80% of the bandwidth and pays a split-K reduce on some shapes. This kernel streams W once in row
blocks of 4 (N / 4 programs, enough to fill the GPU for every shape of the W1 models) with fp32
accumulation. Measured on an H100 (tools/bench_gemv.py, inside CUDA graphs): Llama-3.1-8B gate_up 84 -> 79
us, o 11.0 -> 8.5 us, LM head 377 -> 337 us; Qwen3-0.6B projections 4-6.5 -> 3.3-4.1 us.

With gated=True the input row is the merged [gate, up] projection (2K features) and the kernel applies
SiLU-and-mul on the fly (rounded to the activation dtype as the separate kernel does), so the MLP's down
projection reads gate/up once and the activation never goes to memory.

gemv_ref is F.linear (after SiLU-and-mul when gated): the same result up to the order of the fp32
accumulation.

rms_norm_gemv folds the decoder layer's residual add + RMSNorm into the next projection (input_layernorm ->
qkv_proj, post_attention_layernorm -> gate_up_proj): each program sums x + residual and its RMS in a prologue
(re-reading the K-vector, 8-16 KB from L2, beside its 32+ KB weight tile), normalises each K-block before
its dot, and program 0 alone writes the new residual. One launch and no normed row in memory instead of
rms_norm's kernel + the GEMV; the roundings are rms_norm's (sum in the activation dtype, norm in fp32,
rounded once to the activation dtype, times the norm weight, rounded again), so rms_norm_gemv_ref
(rms_norm_ref, then F.linear) differs only by fp32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             gated: bool = False) -> torch.Tensor:
    if gated:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    return F.linear(x, weight, bias)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w,
                 HAS_BIAS: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kmask = kk < K
        if GATED:  # x = silu(gate) * up, each rounded to the activation dtype like silu_and_mul
            dt = x_ptr.dtype.element_ty
            gate = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + kk, mask=kmask, other=0.0).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
            x = (act * up).to(dt).to(tl.float32)
        else:
            x = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


def rms_norm_gemv_ref(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                      weight: torch.Tensor, bias: torch.Tensor | None = None):
    """(F.linear(rms_norm(x + residual)), x + residual); without a residual (F.linear(rms_norm(x)), x)."""
    from meshserve.kernels.triton_ops import rms_norm_ref

    if residual is None:
        return F.linear(rms_norm_ref(x, norm_weight, eps), weight, bias), x
    normed, new_residual = rms_norm_ref(x, norm_weight, eps, residual)
    return F.linear(normed, weight, bias), new_residual


@triton.jit
def _residual_sum(x_ptr, res_ptr, kk, kmask, HAS_RESIDUAL: tl.constexpr):
    """x + residual over one K-block, rounded to x's dtype (the residual stream rms_norm stores)."""
    x = tl.load(x_ptr + kk, mask=kmask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + kk, mask=kmask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def _rms_norm_gemv_kernel(x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, res_out_ptr, N, K, stride_w, eps,
                          HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ks = tl.arange(0, BLOCK_K)
    dt = x_ptr.dtype.element_ty
    # prologue: sum of squares of h = x + residual; program 0 writes h (the next layer's residual)
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kmask = kk < K
        h = _residual_sum(x_ptr, res_ptr, kk, kmask, HAS_RESIDUAL)
        if HAS_RESIDUAL:  # noqa: SIM102 - a constexpr branch around a runtime one
            if pid == 0:
                tl.store(res_out_ptr + kk, h, mask=kmask)
        hf = h.to(tl.float32)
        sq += hf * hf
    inv_rms = 1.0 / tl.sqrt(tl.sum(sq, 0) / K + eps)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kmask = kk < K
        h = _residual_sum(x_ptr, res_ptr, kk, kmask, HAS_RESIDUAL).to(tl.float32)
        normed = (h * inv_rms).to(dt).to(tl.float32)
        nw = tl.load(nw_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
        a = (nw * normed).to(dt).to(tl.float32)  # the normed row rms_norm would have stored
        w = tl.load(w_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc += w.to(tl.float32) * a[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


def rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  weight: torch.Tensor, bias: torch.Tensor | None = None, block_n: int = 4):
    """Same as rms_norm_gemv_ref for one row x [..., K] (residual alike, or None), norm_weight [K] and
    weight [N, K] all of x's dtype; returns (y [..., N], the new residual: x + residual, or x itself)."""
    n, k = weight.shape
    if x.numel() != k or norm_weight.numel() != k or (residual is not None and residual.numel() != k):
        raise ValueError(f"rms_norm_gemv takes one row of {k} features, got shape {tuple(x.shape)}")
    if not (norm_weight.dtype == weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype)):
        raise ValueError("rms_norm_gemv needs x, residual, norm weight and weight of one dtype")
    x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(x) if residual is not None else x
    block_k = 512 if k >= 2048 else 256
    _rms_norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, residual.contiguous() if residual is not None else x, norm_weight, weight,
        bias if bias is not None else weight, y, new_residual, n, k, weight.stride(0), float(eps),
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=8 if k >= 2048 else 4, num_stages=3)
    return y, new_residual


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         gated: bool = False) -> torch.Tensor:
    """Same as gemv_ref for x [..., K] (gated: [..., 2K]) holding one row, weight [N, K] (rows contiguous)."""
    n, k = weight.shape
    if x.numel() != (2 * k if gated else k):
        raise ValueError(f"gemv takes one row of {2 * k if gated else k} features, got shape {tuple(x.shape)}")
    x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    block_k = 512 if k >= 2048 else 256
    _gemv_kernel[(triton.cdiv(n, 4),)](
        x, weight, bias if bias is not None else weight, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, GATED=gated, BLOCK_N=4, BLOCK_K=block_k,
        num_warps=8 if k >= 2048 else 4, num_stages=3)
    return y
