"""Block-wise FP8 (DeepSeek-V3 / Qwen3 FP8 checkpoints), plain torch: the CPU path and the oracle of
kernels/triton_fp8_block.py.

Weights: w_fp8 [N, K] float8_e4m3fn with scale_inv [ceil(N / BN), ceil(K / BK)] fp32, one scale per BN x BK
block (128 x 128 in every public checkpoint; the last block of a row or column may be partial), and
w = w_fp8 * scale_inv[n // BN, k // BK] ("scale_inv" is the checkpoint's name: it multiplies, like every
dequantization scale here).
Activations: quantized at run time per token and per group of BK input features (1 x BK), so each K block of
the product has one activation scale per row and one weight scale per BN outputs:
  y[m, n] = sum_kb (x_q[m, kb] . w_q[n, kb]) * x_scale[m, kb] * w_scale[n // BN, kb]
The reference dequantizes both operands and multiplies in fp32, which is that sum up to summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meshserve.kernels.quant_ref import _MIN_SCALE, FP8_DTYPE, FP8_MAX, to_fp8


def _expand_blocks(scale: torch.Tensor, n: int, k: int, block: tuple[int, int]) -> torch.Tensor:
    """scale [ceil(n / BN), ceil(k / BK)] -> [n, k], each block's scale repeated over its elements."""
    bn, bk = block
    return scale.float().repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]


def quantize_fp8_per_token_group(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 x [M, K], fp32 scales [M, ceil(K / group_size)]): each row's group of group_size
    features (the last may be shorter) has its absmax mapped to 448."""
    m, k = x.shape
    groups = -(-k // group_size)
    padded = F.pad(x.float(), (0, groups * group_size - k)).reshape(m, groups, group_size)
    scale = (padded.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE)
    return to_fp8(x, _expand_blocks(scale, m, k, (1, group_size))), scale


def quantize_fp8_blockwise(
    weight: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (fp8 weight [N, K], scale_inv [ceil(N / BN), ceil(K / BK)] fp32): each block's absmax
    maps to 448 (how DeepSeek-V3 and Qwen3 FP8 checkpoints are made)."""
    n, k = weight.shape
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = F.pad(weight.float(), (0, kb * bk - k, 0, nb * bn - n)).reshape(nb, bn, kb, bk)
    scale = (padded.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=_MIN_SCALE)
    return to_fp8(weight, _expand_blocks(scale, n, k, block)), scale


def dequantize_fp8_blockwise(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """fp8 weight [N, K] and its block scales -> the weight in dtype (computed in fp32, rounded once)."""
    n, k = weight.shape
    return (weight.float() * _expand_blocks(scale_inv, n, k, block)).to(dtype)


def fp8_block_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] (activation dtype) times a block-wise fp8 weight [N, K]: x quantized per token and per
    group of BK features, both operands dequantized, an fp32 matmul. -> [..., N] in x.dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = quantize_fp8_per_token_group(x2, block[1])
    xd = xq.float() * _expand_blocks(xs, *x2.shape, (1, block[1]))
    y = xd @ dequantize_fp8_blockwise(weight, scale_inv, block).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


__all__ = [
    "FP8_DTYPE",
    "dequantize_fp8_blockwise",
    "fp8_block_linear_ref",
    "quantize_fp8_blockwise",
    "quantize_fp8_per_token_group",
]
