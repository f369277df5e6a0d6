"""Both residual RMSNorms of a decoder layer folded into the GEMVs around them (batch-1 decode, opt-in).

With the selection's norm_fold switch (MESHSERVE_NORM_FOLD=1), a batch-1 step runs each layer as
    QKV (normed on load) -> attention -> o_proj (+ residual, sum of squares) -> gate_up (normed on load)
    -> down_proj (+ residual, sum of squares)
with no norm kernel in between: the producing GEMV adds the residual and sums the squares of its rows of the
new residual stream h into one int64 pair per norm site; the consuming GEMV takes 1 / rms from it
(kernels/triton_norm_fold.py; the torch reference and the fixed-point sum's range: kernels/norm_fold_ref.py).
The hidden state between layers is then h itself (no separate residual). The first layer's input comes from
the embedding, which no GEMV produced, so its norm runs as before (norm_linear's fold or the norm kernel);
the final norm does too (the LM head is outside the model's forward).

The sums live in one buffer of 2 x layers int64 pairs per step, zeroed when the step begins: inside a decode
CUDA graph that zeroing is one captured memset, and each producer adds into its own slot, so a replay starts
from zero and no slot is reused within a step. (The last down_proj's sum goes unread: the final norm runs as
its own kernel.)

Where it does not apply, begin returns None and the layers run their plain path: more than one row, not on a
GPU, tensor parallelism (o_proj and down_proj are row-parallel: the all-reduce sits between the GEMV and the
residual add, so no program owns a complete output), pipeline stages (the caller's check), quantized
projections (fp8 / int4 GEMVs have no such epilogue yet), or layers whose attention or MLP is not Llama's own
(MLA, MoE blocks).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from meshserve.distributed.parallel_state import get_tp_size
from meshserve.layers.linear import _MAX_FUSED_GATED_K, LinearBase
from meshserve.layers.norm import RMSNorm
from meshserve.layers.norm_linear import norm_linear


@functools.cache
def _triton_norm_fold():
    try:
        from meshserve.kernels import triton_norm_fold
    except ImportError:
        return None
    return triton_norm_fold


def fold_ops_for(x: torch.Tensor, enabled: bool):
    """The module with fold_gemv (kernels/triton_norm_fold.py) when enabled and x is one row on a GPU; fp32
    too (unlike the plain GEMV), so fp32 references can run the folded path."""
    if (
        enabled
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and x.numel() == x.shape[-1]
    ):
        return _triton_norm_fold()
    return None


def _layer_folds(layer: nn.Module, dtype: torch.dtype) -> bool:
    if not (getattr(layer, "folds_attn_norm", False) and getattr(layer, "folds_mlp_norm", False)):
        return False
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    return all(not lin.quantized and lin.weight.dtype == dtype for lin in linears) and all(
        norm.weight.dtype == dtype for norm in norms
    )


class NormFold:
    """One step's folded norms: the sums buffer and which slot holds the sum of the current hidden row."""

    def __init__(self, ops, num_sums: int, device: torch.device):
        self.ops = ops
        # one int64 pair per norm site (kernels/norm_fold_ref.py); zeroed by a memset in the decode graph
        self.sums = torch.zeros(num_sums, 2, dtype=torch.int64, device=device)
        self.filled = 0  # slots the producers have used; the current row's sum is the last of them

    @classmethod
    def begin(cls, hidden: torch.Tensor, layers) -> NormFold | None:
        """The fold for this step's layers from the embedding's output, or None where it does not apply."""
        if len(layers) == 0 or not getattr(layers[0], "folds_attn_norm", False) or get_tp_size() > 1:
            return None
        ops = fold_ops_for(hidden, layers[0].self_attn.qkv_proj.kernels.norm_fold)  # the switch first: cheap
        if ops is None or not all(_layer_folds(layer, hidden.dtype) for layer in layers):
            return None
        return cls(ops, 2 * len(layers), hidden.device)

    def norm_linear(self, norm: RMSNorm, linear: LinearBase, h: torch.Tensor) -> torch.Tensor:
        """linear(norm(h)) for h the whole residual stream: normed on load from its producer's sum; the first
        layer's h (the embedding) has none, so its norm runs as in the plain path."""
        if self.filled == 0:
            fused = norm_linear(norm, linear, h, None)
            return fused[0] if fused is not None else linear(norm(h))
        return self.ops.fold_gemv(
            h,
            linear.weight,
            linear.bias,
            norm_weight=norm.weight,
            eps=norm.eps,
            sum_in=self.sums[self.filled - 1],
        )

    def linear_residual(
        self, linear: LinearBase, x: torch.Tensor, residual: torch.Tensor, act_fn: nn.Module | None = None
    ) -> torch.Tensor:
        """linear(x) + residual, the new residual stream, its sum of squares into the next slot. With act_fn
        x is the merged gate/up row: SiLU-and-mul runs inside the GEMV where the plain path fuses it too
        (RowParallelLinear.fused_gated_forward's bound), else act_fn first."""
        gated = act_fn is not None and linear.weight.shape[1] <= _MAX_FUSED_GATED_K
        if act_fn is not None and not gated:
            x = act_fn(x)
        self.filled += 1
        return self.ops.fold_gemv(
            x, linear.weight, linear.bias, gated=gated, residual=residual, sum_out=self.sums[self.filled - 1]
        )
