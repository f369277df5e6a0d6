"""SiLU-and-mul: the gated MLP activation over the merged gate/up projection."""

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.kernels.fused import fused_ops_for


class SiluAndMul(nn.Module):
    """Input [..., 2*d] = concat(gate, up); output silu(gate) * up of shape [..., d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops_for(x)
        if ops is not None:
            return ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
