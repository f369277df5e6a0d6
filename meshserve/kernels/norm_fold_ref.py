"""The torch reference of the folded RMSNorm (kernels/triton_norm_fold.py), with the same fixed-point sum.

Batch-1 decode folds each residual add + RMSNorm into the GEMVs around it: the producing projection (o_proj,
down_proj) adds the residual to its output rows and adds those rows' sum of squares into one int64
accumulator; the consuming projection (gate_up, the next layer's QKV) takes 1 / rms from that accumulator and
scales the row by it and the norm weight on load. No kernel of its own is left for either norm.

The sum is fixed point so that it is deterministic: every GEMV program adds integers, and integer adds
commute, so the bits do not depend on which program's atomic lands first (fp32 atomics would, run to run and
eager vs graph replay). Each program's fp32 sum of squares over its BLOCK_N rows (its part) is scaled by 2^24
and split into a whole number and a fraction, added to two int64s: the whole, and the fraction in units of
2^-40 (so the pair holds the sum in units of 2^-64). A fraction of fp32 holds at most 24 significant bits, so
it is exact in 2^-40 units down to parts of 2^-41: the pair is the exact sum of the parts (no rounding that
grows as the row shrinks, unlike one word of 2^-24 units, which lost 0.2% of the sum of a row of 1e-3s), and
the consumer rounds it to fp32 once (whole * 2^-24 + fraction * 2^-64).

The range: each part is capped at 2^62 / programs (in units of 2^-24), so the wholes never pass 2^62 and
never wrap (the fractions stay below programs x 2^40). A row whose sum of squares is within 2^38 (2.7e11:
an RMS up to 8,192 at K = 4,096) and no program's part past 2^62 / programs / 2^24 (Llama-3.1-8B's o_proj /
down_proj, 1,024 programs: 2^28, any four |h| up to 16,384 each) is summed exactly. Past it, a part
saturates: the norm then comes out too large for that row (finite and deterministic, but wrong), so a model
whose residual stream grows that far must keep the switch off.

fold_gemv_ref mirrors the kernel's roundings: the normed row as rms_norm computes it (rounded to the
activation dtype, times the norm weight, rounded again), the projection's output rounded to the activation
dtype before the residual add (as o_proj's output is), the sum rounded to the dtype (the new residual). It
differs from the Triton kernel only in the order of the fp32 sums (the projection's and each program's sum
of squares).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUM_SCALE = float(1 << 24)  # a part in units of 2^-24: the first int64 (the whole)
FRAC_SCALE = float(1 << 40)  # its fraction in units of 2^-40 (of 2^-24): the second int64


def part_limit(n: int, block_n: int) -> float:
    """The cap of one program's scaled part (N / block_n programs): their total stays below 2^62."""
    return float((1 << 62) // -(-n // block_n))


def fixed_point_sum_of_squares(h: torch.Tensor, block_n: int = 4) -> torch.Tensor:
    """The int64 pair [whole, fraction] a producer GEMV of block_n-row programs adds for the row h: per
    program the fp32 sum of its rows' squares times 2^24, capped (part_limit), split at the point."""
    hf = h.reshape(-1).float()
    n = hf.numel()
    parts = F.pad(hf * hf, (0, -n % block_n)).view(-1, block_n).sum(1)
    scaled = torch.clamp(parts * SUM_SCALE, max=part_limit(n, block_n))
    whole = torch.floor(scaled)
    frac = ((scaled - whole) * FRAC_SCALE + 0.5).to(torch.int64)
    return torch.stack([whole.to(torch.int64).sum(), frac.sum()])


def sum_of_squares(total: torch.Tensor) -> torch.Tensor:
    """The pair as one fp32 sum of squares (the consumer's one rounding)."""
    return total[0].to(torch.float32) * (1.0 / SUM_SCALE) + total[1].to(torch.float32) * (
        1.0 / (SUM_SCALE * FRAC_SCALE)
    )


def inv_rms_from_sum(total: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """1 / rms in fp32 from the fixed-point sum of squares of a K-long row (rms_norm's formula)."""
    return 1.0 / torch.sqrt(sum_of_squares(total) / k + eps)


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
    h's fixed-point sum of squares to sum_out (two int64s) in place; otherwise returns the projection."""
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
