"""The tensor-parallel all-reduce of a row-parallel projection, the residual add and the next RMSNorm.

A TP decoder layer's o_proj and down_proj leave partial sums that are all-reduced, added to the residual
stream and normed for the next projection. all_reduce_rms_norm takes the partial sums and does all three:
in one kernel over symmetric memory where it serves (kernels/triton_all_reduce_norm.py, a batch-1 decode
row among others), else the ordinary all-reduce then the norm layer. A model calls it only with the
selection's tp_fused_norm switch on, and then asks its projections for unreduced outputs (reduce=False).
"""

from __future__ import annotations

import torch

from meshserve.distributed.parallel_state import (
    tensor_parallel_all_reduce,
    tensor_parallel_all_reduce_rms_norm,
)
from meshserve.layers.norm import RMSNorm


def all_reduce_rms_norm(
    norm: RMSNorm, partial: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(total + residual), total + residual), total = the TP group's sum of partial; without a residual
    (norm(total), total): what `norm(all_reduce(partial), residual)` gives on the unfused path."""
    push = norm.kernels.tp_fused_norm == "push"
    fused = tensor_parallel_all_reduce_rms_norm(partial, residual, norm.weight, norm.eps, push)
    if fused is not None:
        return fused
    total = tensor_parallel_all_reduce(partial)
    if residual is None:
        return norm(total), total
    return norm(total, residual)
