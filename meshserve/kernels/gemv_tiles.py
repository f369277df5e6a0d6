"""Tile shape of a batch-1 quantized GEMV launch, and the split-K reduce pass they share.

A GEMV program owns block_n output features and a K range; with split_k > 1 the K axis is cut in split_k
ranges whose fp32 partial sums go to a workspace [split_k, M, N] and one more kernel sums them, applies the
per-channel scale and bias and rounds to the output dtype (deterministic, unlike fp32 atomics, and no memset).
Split-K is for shapes whose N / block_n programs cannot fill the GPU's SMs (o_proj and down at N = 4,096 on
132 SMs with wide tiles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvTiles:
    """block_n output features per program, block_k input features per loop step, split_k K ranges."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def split_k_range(k: int, tiles: GemvTiles) -> tuple[int, int]:
    """(input features per K range, a multiple of block_k; the number of ranges that are not empty)."""
    per_split = triton.cdiv(triton.cdiv(k, tiles.split_k), tiles.block_k) * tiles.block_k
    return per_split, triton.cdiv(k, per_split)


@triton.jit
def _split_k_reduce_kernel(
    part_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    MN,
    N,
    SPLIT_K,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    cols = offs % N
    if HAS_SCALE:
        acc *= tl.load(s_ptr + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def split_k_reduce(
    partials: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """y [M, N] = (sum over partials [S, M, N] fp32) * scale [N] fp32 (+ bias [N]), rounded to y's dtype."""
    s, m, n = partials.shape
    block = 1024
    _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
        partials,
        scale if scale is not None else partials,
        bias if bias is not None else y,
        y,
        m * n,
        n,
        s,
        HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None,
        BLOCK=block,
        num_warps=4,
    )
    return y
