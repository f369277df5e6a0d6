"""FP8 (e4m3) weights: quantized online from a 16-bit checkpoint, or loaded pre-quantized.

Whatever the source, a layer ends with weight [N, K] float8_e4m3fn and weight_scale [N] fp32 (per output
channel; a per-tensor checkpoint scale is broadcast over its shard's rows, so merged q/k/v keep their own
scales) and optionally a static input_scale (the largest of the merged shards'). Activations are quantized
per token at run time unless the checkpoint gives a static input scale.

Checkpoint formats read (config.json's quantization_config):
  compressed-tensors  float-quantized 8-bit float weights, strategy "channel" (weight_scale [N, 1]) or "tensor"
                      ([1]); input activations dynamic per token, or static per tensor (input_scale)
  fbgemm_fp8          weight_scale [N, 1], dynamic per-token activations (input_scale_ub is read and unused)
  fp8                 HF's FP8 with "activation_scheme" dynamic or static and per-tensor weight_scale; block-wise
                      weight_scale_inv (weight_block_size) is fp8_block.py's
"""

from __future__ import annotations

import torch
from torch import nn

from meshserve.kernels.quant_ops import fp8_linear, fp8_rows_fit, fp8_rows_linear
from meshserve.kernels.quant_ref import FP8_DTYPE, quantize_fp8_per_channel
from meshserve.layers.quantization.base import LinearMethod, QuantConfig, new_param, replace_param


def fp8_weight_param(
    layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype, online: bool
) -> None:
    """weight [N, K]: fp8 as the checkpoint stores it, or 16-bit (dtype) until quantized after loading
    (online)."""
    fp8_or_16 = dtype if online else FP8_DTYPE
    new_param(layer, "weight", (out_features, in_features), fp8_or_16, output_dim=0, input_dim=1)


class Fp8Config(QuantConfig):
    """online: quantize 16-bit weights after loading; otherwise the checkpoint holds fp8 weights and scales
    (static_input_scale: it also holds input_scale)."""

    def __init__(self, source: str = "online", static_input_scale: bool = False, extra_optional=()):
        self.name = "fp8" if source == "online" else source
        self.online = source == "online"
        self.static_input_scale = static_input_scale
        self.extra_optional = tuple(extra_optional)  # checkpoint tensors read and unused

    def linear_method(self) -> LinearMethod:
        return Fp8LinearMethod(self)

    def describe(self) -> str:
        acts = "static per-tensor" if self.static_input_scale else "dynamic per-token"
        return f"{self.name} (fp8 e4m3 weights, per-channel scales, {acts} activation scales)"


class Fp8LinearMethod(LinearMethod):
    name = "fp8"

    def __init__(self, config: Fp8Config):
        self.config = config

    def create_weights(self, layer, in_features, out_features, dtype):
        c = self.config
        fp8_weight_param(layer, in_features, out_features, dtype, c.online)
        if c.online:
            return
        new_param(layer, "weight_scale", (out_features,), torch.float32, output_dim=0)
        if c.static_input_scale:
            new_param(layer, "input_scale", (), torch.float32, reduce_max=True)
        for name in c.extra_optional:
            new_param(layer, name, (1,), torch.float32, optional=True)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.config.online:
            weight, scale = quantize_fp8_per_channel(layer.weight.data)
            replace_param(layer, "weight", weight)
            replace_param(layer, "weight_scale", scale)
        for name in self.config.extra_optional:
            replace_param(layer, name, None)
        if not self.config.static_input_scale:
            layer.input_scale = None

    def apply(self, layer, x, bias):
        kernels = layer.kernels
        return fp8_linear(
            x,
            layer.weight,
            layer.weight_scale,
            layer.input_scale,
            bias,
            gemv=kernels.gemv,
            gemv_variant=kernels.fp8_gemv,
            gemm=kernels.fp8_gemm,
        )

    def takes_fp8_rows(self, layer, x):
        # dynamic per-token scales (a static one is the checkpoint's), the fused ops selected, > 1 GPU row
        return layer.input_scale is None and layer.kernels.fused_ops and fp8_rows_fit(x, layer.weight)

    def apply_fp8_rows(self, layer, xq, xs, out_dtype, bias):
        return fp8_rows_linear(xq, xs, layer.weight, layer.weight_scale, bias, out_dtype, layer.kernels.fp8_gemm)
