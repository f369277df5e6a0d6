"""The torch reference of the folded RMSNorm (kernels/triton_norm_fold.py), with the same fixed-point sum.

Batch-1 decode folds each residual add + RMSNorm into the GEMVs around it: the producing projection (o_proj,
down_proj) adds the residual to its output rows and adds those rows' sum of squares into one int64
accumulator; the consuming projection (gate_up, the next layer's QKV) takes 1 / rms from that accumulator and
scales the row by it and the norm weight on load. No kernel of its own is left for either norm.

The sum is fixed point so that it is deterministic: every GEMV program adds an integer, and integer adds
commute, so the bits do not depend on which program's atomic lands first (fp32 atomics would, run to run and
eager vs graph replay). Each program's fp32 sum of squares over its BLOCK_N rows is scaled by 2^24 and
rounded to the nearest integer: an absolute resolution of 6e-8 per program. The range: each program's part is
capped at 2^62 / programs (scaled), so the total never passes 2^62 and never wraps; a row whose sum of squares
is within 2^38 (2.7e11: an RMS up to 8,192 at K = 4,096) with no BLOCK_N rows summing past 2^62 / programs /
2^24 (Llama-3.1-8B's o_proj / down_proj: 2^28, any |h| up to 16,384) is summed exactly as described. Past
it, a part saturates: the norm then comes out too large for that row (finite, deterministic, wrong), so a
model whose residual stream grows that far must keep the switch off.

fold_gemv_ref mirrors the kernel's roundings: the normed row as rms_norm computes it (rounded to the
activation dtype, times the norm weight, rounded again), the projection's output rounded to the activation
dtype before the residual add (as o_proj's output is), the sum rounded to the dtype (the new residual). It
differs from the Triton kernel only in the order of the fp32 sums (the projection's and each program's sum
of squares).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUM_SHIFT = 24  # the fixed point: sums of squares in units of 2^-24
SUM_SCALE = float(1 << SUM_SHIFT)


def part_limit(n: int, block_n: int) -> float:
    """The cap of one program's scaled part (N / block_n programs): their total stays below 2^62."""
    return float((1 << 62) // -(-n // block_n))


def fixed_point_sum_of_squares(h: torch.Tensor, block_n: int = 4) -> torch.Tensor:
    """The int64 sum a producer GEMV of block_n-row programs adds for the row h: per program, the fp32 sum
    of its rows' squares, times 2^24, capped (part_limit), rounded to nearest; the parts summed exactly."""
    hf = h.reshape(-1).float()
    n = hf.numel()
    parts = F.pad(hf * hf, (0, -n % block_n)).view(-1, block_n).sum(1)
    scaled = torch.clamp(parts * SUM_SCALE, max=part_limit(n, block_n))
    return (scaled + 0.5).to(torch.int64).sum()


def inv_rms_from_sum(total: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """1 / rms in fp32 from the fixed-point sum of squares of a K-long row (rms_norm's formula)."""
    return 1.0 / torch.sqrt(total.to(torch.float32) * (1.0 / SUM_SCALE) / k + eps)


def normed_from_sum(
    h: torch.Tensor, norm_weight: torch.Tensor, total: torch.Tensor, eps: float
) -> torch.Tensor:
    """rms_norm(h) with its statistics from the fixed-point sum: (weight * (h * inv_rms).to(dt)).to(dt)."""
    inv_rms = inv_rms_from_sum(total, h.shape[-1], eps)
    return (norm_weight.float() * (h.float() * inv_rms).to(h.dtype).float()).to(h.dtype)


def fold_gemv_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gated: bool = False,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    sum_in: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    sum_out: torch.Tensor | None = None,
    block_n: int = 4,
) -> torch.Tensor:
    """triton_norm_fold.fold_gemv in torch. Consumer (norm_weight and sum_in given): the input row is
    rms_norm(x) from sum_in. Producer (residual and sum_out given): returns h = linear + residual and adds
    h's fixed-point sum of squares to sum_out in place; otherwise returns the projection."""
    if gated:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    if norm_weight is not None:
        x = normed_from_sum(x, norm_weight, sum_in, eps)
    y = F.linear(x, weight, bias)
    if residual is None:
        return y
    h = (y.float() + residual.float()).to(y.dtype)
    sum_out += fixed_point_sum_of_squares(h, block_n)
    return h
