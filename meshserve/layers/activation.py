"""SiLU-and-mul: the gated MLP activation over the merged gate/up projection."""

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.kernels.fused import fused_ops_for
from meshserve.layers.backend_selection import PLAIN


class SiluAndMul(nn.Module):
    """Input [..., 2*d] = concat(gate, up); output silu(gate) * up of shape [..., d]."""

    def __init__(self):
        super().__init__()
        self.kernels = PLAIN  # bound by the model runner (layers/backend_selection.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops_for(x, self.kernels.fused_ops)
        if ops is not None:
            return ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
