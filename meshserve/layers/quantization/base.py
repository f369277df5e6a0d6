"""What a weight format is to a linear layer: a LinearMethod creates the layer's tensors, says how each is sliced
across tensor-parallel ranks, converts them once loaded, and computes the projection.

Every tensor a method creates carries its layout as attributes, which the parallel layers' weight loaders read
(layers/linear.py), so one loader slices plain weights, fp8 scales and packed INT4 tensors alike:
  output_dim / input_dim   which axis runs over output / input features (None: the tensor is not split on it)
  output_pack / input_pack features per element along that axis (8 for packed nibbles, the group size for
                           per-group scales)
  reduce_max               a per-tensor scalar that merged projections share: the largest loaded value wins
  optional                 the checkpoint may leave it out
  same_across_shards       replicated, and merged projections must all load the same values (GPTQ's g_idx)
"""

from __future__ import annotations

import torch
from torch import nn

from meshserve.kernels.fused import decode_gemm_for, gemv_for, linear


def new_param(
    layer: nn.Module,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    output_dim: int | None = None,
    input_dim: int | None = None,
    output_pack: int = 1,
    input_pack: int = 1,
    reduce_max: bool = False,
    optional: bool = False,
    same_across_shards: bool = False,
    fill: float | None = None,
) -> nn.Parameter:
    """Register a frozen parameter on layer with its slicing layout (see the module docstring); fill: its
    value until loaded (reduce_max scalars start at 0)."""
    data = torch.empty(shape, dtype=dtype)
    if fill is not None or reduce_max:
        data.fill_(fill or 0)
    param = nn.Parameter(data, requires_grad=False)
    param.output_dim, param.input_dim = output_dim, input_dim
    param.output_pack, param.input_pack = output_pack, input_pack
    param.reduce_max, param.optional, param.same_across_shards = reduce_max, optional, same_across_shards
    layer.register_parameter(name, param)
    return param


def replace_param(layer: nn.Module, name: str, data: torch.Tensor | None) -> None:
    """Swap a parameter for a converted tensor (None: drop it) once loading is over."""
    if hasattr(layer, name):
        delattr(layer, name)
    if data is not None:
        layer.register_parameter(name, nn.Parameter(data, requires_grad=False))


class LinearMethod:
    """A linear layer's weight format. Sizes are this rank's: in_features x out_features."""

    name = "unquantized"

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Convert the loaded checkpoint tensors into what apply() reads (quantize, repack)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def apply_act_out(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """silu(gate) * up of a [gate | up] layer's output for x from one kernel (batch-1 GEMVs with SiLU-and-mul
        in their epilogue), or None where this format has no such path for x. 16-bit weights only: the same
        epilogue in the fp8 words GEMV cost W1 Llama-3.1-8B fp8 0.8% (H200 2026-12-04: 359.1 vs 361.9 tok/s,
        two processes each), where the bf16 GEMV's gained 1.0%."""
        return None

    def takes_fp8_rows(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Whether apply_fp8_rows may serve x's rows quantized per token by their producer (the fused
        RMSNorm / SiLU-and-mul + fp8 kernels) instead of apply(x). Only dynamic per-token fp8 says yes."""
        return False

    def apply_fp8_rows(self, layer: nn.Module, xq: torch.Tensor, xs: torch.Tensor, out_dtype: torch.dtype,
                       bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    """Weights in the model dtype: F.linear, or the Triton GEMV for batch-1 rows on a GPU."""

    def create_weights(self, layer, in_features, out_features, dtype):
        new_param(layer, "weight", (out_features, in_features), dtype, output_dim=0, input_dim=1)

    def apply(self, layer, x, bias):
        return linear(x, layer.weight, bias, gemv=layer.kernels.gemv, skinny=layer.kernels.skinny_gemv,
                      decode_gemm=layer.kernels.decode_gemm)

    def apply_act_out(self, layer, x, bias):
        mod = gemv_for(x, layer.weight, layer.kernels.gemv)
        if mod is not None:
            return mod.gemv(x, layer.weight, bias, act_out=True)
        gemm = decode_gemm_for(x, layer.weight, layer.kernels.decode_gemm)  # a decode step's rows: its epilogue
        return None if gemm is None else gemm.gemm_16bit(x, layer.weight, bias, act_gated=True)


class QuantConfig:
    """A checkpoint's (or the user's) quantization: which LinearMethod every linear layer gets."""

    name = "none"

    def linear_method(self) -> LinearMethod:
        raise NotImplementedError

    def unquantized_method(self) -> LinearMethod:
        """The method of layers that stay 16-bit under this format (kv_b_proj, replicated layers)."""
        return UnquantizedLinearMethod()

    def describe(self) -> str:
        return self.name
