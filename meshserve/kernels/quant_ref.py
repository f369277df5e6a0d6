"""Plain torch quantization math: FP8 (e4m3) scaling and INT4 group-wise packing, the CPU path and the oracle of
the Triton kernels in kernels/triton_quant.py.

FP8 follows torch._scaled_mm's semantics: y = (x_q @ w_q^T) * x_scale[:, None] * w_scale[None, :], where
x = x_q * x_scale per token (dynamic) or per tensor (static) and w = w_q * w_scale per output channel. The
reference upcasts the fp8 operands (CPU torch casts float8 but has no fp8 matmul), so CPU tests run the same
rounded numbers the GPU multiplies.

INT4 weights live in one internal layout whatever the checkpoint's (AWQ and GPTQ are repacked at load):
  qweight [K / 8, N] int32, nibble i (bits 4i..4i+3) of row r is the weight of input feature 8r + i
  scales  [G, N] and zeros [G, N] (zero points as floats), w[k, n] = (q[k, n] - zeros[g, n]) * scales[g, n]
  g_idx   [K] int32, the group g of input feature k; None means k // group_size. GPTQ's act-order (desc_act)
          checkpoints need it, and so does a row-parallel slice of one (its features' groups are scattered)
  perm    [K] int32 instead of g_idx where act-order groups were sorted at load (int4_group_order): K row k
          holds input feature perm[k], the groups are plain (k // group_size), and y = x[..., perm] @ W
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_MIN_SCALE = 1e-12  # an all-zero row gets this scale instead of a division by zero


def to_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale rounded to e4m3, saturated at +-448 (a plain cast turns overflow into NaN)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (fp8 weight [N, K], fp32 scale [N]): each output row's absmax maps to 448."""
    scale = (weight.float().abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)
    return to_fp8(weight, scale[:, None]), scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 x [M, K], fp32 scale [M, 1]): dynamic per-token activation scales."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return to_fp8(x, scale), scale


def quantize_activation(x2: torch.Tensor, input_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] -> (fp8 [M, K], fp32 scale): per token ([M, 1]) when input_scale is None, else the checkpoint's
    static per-tensor scale ([1, 1])."""
    if input_scale is None:
        return quantize_fp8_per_token(x2)
    return to_fp8(x2, input_scale), input_scale.float().reshape(1, 1)


def fp8_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] (activation dtype) times an fp8 weight [N, K] with per-channel scales [N]; the activation is
    quantized per token (input_scale None) or with the checkpoint's static per-tensor scale. -> [..., N]."""
    shape = x.shape
    xq, xs = quantize_activation(x.reshape(-1, shape[-1]), input_scale)
    y = (xq.float() @ weight.float().t()) * xs * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def fp8_weight_only_ref(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The batch-1 GEMV's semantics: the fp8 weight dequantized, the activation left in its dtype."""
    w = weight.float() * weight_scale.float()[:, None]
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# INT4, the internal layout
# ----------------------------------------------------------------------------------------------------------
def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """q [K, N] of values 0..15 -> [K / 8, N] int32, nibble i of row r = q[8r + i]."""
    k, n = q.shape
    q = q.to(torch.int64).reshape(k // 8, 8, n)
    shifts = (torch.arange(8, dtype=torch.int64, device=q.device) * 4)[None, :, None]
    packed = (q << shifts).sum(dim=1)  # nibbles do not overlap: the sum is the bitwise or
    return _as_int32(packed)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4_rows: [K / 8, N] int32 -> [K, N] int32 of values 0..15."""
    shifts = (torch.arange(8, dtype=torch.int32, device=packed.device) * 4)[None, :, None]
    q = (packed[:, None, :] >> shifts) & 0xF
    return q.reshape(-1, packed.shape[1])


def _as_int32(v: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the int32 with the same bits."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def int4_dequant_ref(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The internal INT4 layout -> the weight [K, N] (input-major, as stored), computed in fp32 and rounded
    once to dtype (default: scales' dtype)."""
    q = unpack_int4_rows(qweight).float()
    groups = torch.arange(q.shape[0], device=q.device) // group_size if g_idx is None else g_idx.long()
    return ((q - zeros.float()[groups]) * scales.float()[groups]).to(dtype or scales.dtype)


def int4_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequantized weight [K, N] (+ bias); perm: x's features permuted first (see above)."""
    w = int4_dequant_ref(qweight, scales, zeros, group_size, g_idx, dtype=x.dtype)
    return F.linear(x if perm is None else x.index_select(-1, perm), w.t(), bias)


def int4_group_order(g_idx: torch.Tensor, group_size: int, groups: int) -> torch.Tensor | None:
    """Where act-order weights (g_idx [K]) can become plain group-wise ones exactly: perm [K] int32, a stable
    argsort of g_idx, when g_idx[perm] is arange(K) // group_size with K // group_size == groups (every group a
    contiguous run of exactly group_size rows at a multiple of it once sorted); else None (a group of another
    size, or a row-parallel slice holding parts of groups). With qweight's K rows reordered by perm
    (permute_int4_rows), int4_linear_ref(x, qweight, ..., g_idx) == int4_linear_ref(x, sorted, ..., perm=perm)
    up to the order of the sum: the same products of the same dequantized weights."""
    k = g_idx.shape[0]
    if group_size <= 0 or k % group_size or k // group_size != groups:
        return None
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], torch.arange(k, device=g_idx.device) // group_size):
        return None
    return perm.to(torch.int32)


def permute_int4_rows(qweight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """qweight [K / 8, N] with its K rows (unpacked) reordered: row k of the result is row perm[k]."""
    out = torch.empty_like(qweight)
    for c in range(0, qweight.shape[1], 2048):  # column chunks: the unpacked copy (int64 when packed) stays small
        out[:, c : c + 2048] = pack_int4_rows(unpack_int4_rows(qweight[:, c : c + 2048])[perm.long()])
    return out


@dataclass
class Int4Weights:
    """One weight quantized to INT4, unpacked: w[k, n] ~ (q[k, n] - zeros[g_idx[k], n]) * scales[g_idx[k], n]."""

    q: torch.Tensor  # [K, N] int32 values 0..15
    scales: torch.Tensor  # [G, N]
    zeros: torch.Tensor  # [G, N], integer-valued
    g_idx: torch.Tensor  # [K] int32


def quantize_int4_groups(
    weight: torch.Tensor, group_size: int, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest INT4 of weight [N, K] in groups of group_size input features.
    -> (q [K, N] int values 0..15, scales [K / G, N], zeros [K / G, N] integer-valued) in weight's dtype,
    with weight ~ (q - zeros[k // G]) * scales[k // G] (the AWQ / GPTQ convention). min_zero 1 keeps zero
    points writable in GPTQ v1 checkpoints, which store zero - 1 in a nibble."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"input features ({k}) are not a multiple of the group size ({group_size})")
    w = weight.float().t().reshape(k // group_size, group_size, n)
    w_min = w.amin(dim=1).clamp(max=0.0)
    w_max = w.amax(dim=1).clamp(min=0.0)
    scales = ((w_max - w_min) / 15.0).clamp(min=1e-8)
    zeros = (-w_min / scales).round().clamp(min_zero, 15)
    q = (w / scales[:, None, :] + zeros[:, None, :]).round().clamp(0, 15)
    return q.reshape(k, n).to(torch.int32), scales.to(weight.dtype), zeros.to(weight.dtype)
