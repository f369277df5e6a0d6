"""Skinny projection in Triton: y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for a few rows (2 <= M <= 16), 16-bit.

A speculative verify step at batch 1 scores k + 1 rows (issue 22); one-row decode takes the batch-1 GEMV
(triton_gemv.py), but 5 rows fall to cuBLAS, whose GEMM tiles for M = 5 left the H200's verify step at 1.55x a
decode step (7.4 vs 4.76 ms, Llama-3.1-8B) where the weights are read once either way. Here each program
streams BLOCK_N weight rows over K once and multiplies every input row by each tile it loads: the M rows are
padded to one 16-row tensor-core tile (tl.dot; padding rows are masked loads, free while the step is
memory-bound: 16 rows x 2 FLOPs per weight byte is far below the tensor cores' rate). Projections with too
few row blocks to fill the GPU split K over SPLIT_K programs that write fp32 partials, summed after.
The tiles are a first guess, to be swept on the H200 (tools/bench_skinny_gemv.py).

skinny_gemv_ref is F.linear: the same products up to the order of the fp32 accumulation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# the most rows this kernel takes: one tensor-core tile of M. A verify step at batch 1 (k + 1 <= 16 tokens)
# replays the 16-token mixed-step graph (engine/mixed_graph.py MIN_BUCKET), so its linears see 16 rows,
# padding included; larger batches are GEMMs cuBLAS tiles well
MAX_ROWS = 16
_BLOCK_M = 16


def skinny_gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class SkinnyTiles:
    """One launch's tiles: weight rows per program, K per loop step, programs over K, warps, stages."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


def skinny_tiles(n: int, k: int, num_sms: int) -> SkinnyTiles:
    """Tiles for N outputs of K features on a GPU of num_sms: 16 weight rows x 256 columns (8 KB) per step,
    three in flight, two warps (each its own 8 of the 16 columns of the m16n8 products: with four, ptxas
    sm_90 code has two warps repeat each product and its shared-memory reads); K split (fp32 partials, summed by two more kernels) only while the row blocks leave
    SMs idle (Qwen3-0.6B's 1,024-output projections), each split keeping at least four K steps."""
    block_n, block_k = 16, 256
    programs = triton.cdiv(n, block_n)
    split = 1
    max_split = max(1, k // (4 * block_k))
    while programs * split < num_sms and split * 2 <= max_split:
        split *= 2
    return SkinnyTiles(block_n, block_k, split, num_warps=2, num_stages=4)


@triton.jit
def _skinny_gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_w, stride_ym, k_per_split,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Program (n, s): outputs [n * BLOCK_N, +BLOCK_N) of every row over K columns [s * k_per_split, +k_per_split).
    SPLIT_K > 1: y_ptr is an fp32 [SPLIT_K, M, N] buffer of partial sums (bias added by the caller)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_w
    x_rows = x_ptr + ms[:, None].to(tl.int64) * stride_xm
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + ks
        kmask = kk < k_hi
        x = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    out = y_ptr + ms[:, None].to(tl.int64) * stride_ym + cols[None, :]
    omask = mmask[:, None] & cmask[None, :]
    if SPLIT_K > 1:
        tl.store(out + pid_s.to(tl.int64) * M * N, acc, mask=omask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=omask)


@functools.cache
def _sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: an H100/H200's count, so CPU tests take the GPU's tiles
    return _sms_of(device.index if device.index is not None else torch.cuda.current_device())


def skinny_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                tiles: SkinnyTiles | None = None) -> torch.Tensor:
    """Same as skinny_gemv_ref for x [..., K] holding 1 to MAX_ROWS rows and weight [N, K] of x's dtype.
    tiles: the launch's tiles (None: skinny_tiles for this shape)."""
    n, k = weight.shape
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    m = rows.shape[0]
    if x.shape[-1] != k or not 1 <= m <= MAX_ROWS:
        raise ValueError(f"skinny_gemv takes 1 to {MAX_ROWS} rows of {k} features, got shape {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"skinny_gemv needs x and weight of one dtype, got {x.dtype} and {weight.dtype}")
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    t = tiles or skinny_tiles(n, k, _num_sms(x.device))
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if t.split_k > 1:
        k_per_split = triton.cdiv(triton.cdiv(k, t.split_k), t.block_k) * t.block_k
        split = triton.cdiv(k, k_per_split)
        out = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    else:
        k_per_split, split, out = k, 1, y
    _skinny_gemv_kernel[(triton.cdiv(n, t.block_n), split)](
        rows, weight, bias if bias is not None else weight, out, m, n, k, rows.stride(0), weight.stride(0),
        out.stride(-2), k_per_split, HAS_BIAS=bias is not None, BLOCK_M=_BLOCK_M, BLOCK_N=t.block_n,
        BLOCK_K=t.block_k, SPLIT_K=split, num_warps=t.num_warps, num_stages=t.num_stages)
    if split > 1:
        total = out.sum(0)
        if bias is not None:
            total += bias.float()
        y.copy_(total)
    return y.reshape(*x.shape[:-1], n)
