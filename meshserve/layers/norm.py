"""RMSNorm, with the residual add fused into the same call (the GPU path fuses it into one kernel)."""

import torch
from torch import nn

from meshserve.kernels.fused import fused_ops_for
from meshserve.layers.backend_selection import PLAIN


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32 like HF transformers.

    forward(x, residual) returns (normed(x + residual), x + residual) so the decoder layer carries the
    residual stream without an extra add. With the fused ops selected, one Triton kernel does both.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.kernels = PLAIN  # bound by the model runner (layers/backend_selection.py)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        orig_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(orig_dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        ops = fused_ops_for(x, self.kernels.fused_ops)
        if ops is not None:  # one kernel for add + norm instead of ~8
            return ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
