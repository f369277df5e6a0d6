"""Block-wise FP8 weights: HF's "fp8" quantization_config with weight_block_size [128, 128], the format of
DeepSeek-V3/R1 and the official Qwen3 FP8 checkpoints (kernels/fp8_block_ref.py has the math).

A layer holds the checkpoint's tensors as stored: weight [N, K] float8_e4m3fn and weight_scale_inv
[ceil(N / 128), ceil(K / 128)] fp32; activations are quantized per token and per 128 input features at run
time. Tensor parallelism slices the scales with the weight (128 output rows or input features per scale), so a
rank's share must start on a block boundary: column-parallel shards (each of q/k/v or gate/up) must hold whole
128-row blocks, row-parallel ranks whole 128-feature blocks; the last shard of an unsplit layer may end in a
partial block, as the checkpoint's does. Anything else is a one-line error naming the layer and the split.

Layers that stay 16-bit whatever the format (MLA's kv_b_proj, whose weight attention reads directly, and
replicated layers such as DeepSeek's q_a_proj / kv_a_proj_with_mqa or MoE routers) get Fp8BlockDequantMethod:
a checkpoint's fp8 copy and its scales are dequantized once at load (as vLLM does for kv_b_proj), a 16-bit
copy loads as is.

With dummy weights (no checkpoint) the config is "online": 16-bit weights are quantized block-wise at load, so
benchmarks at real sizes run the same kernel.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from meshserve.kernels.fp8_block_ref import dequantize_fp8_blockwise, quantize_fp8_blockwise
from meshserve.kernels.quant_ops import fp8_block_linear
from meshserve.layers.quantization.base import (
    LinearMethod,
    QuantConfig,
    UnquantizedLinearMethod,
    new_param,
    replace_param,
)
from meshserve.layers.quantization.fp8 import fp8_weight_param

SUPPORTED_BLOCK = (128, 128)


class Fp8BlockConfig(QuantConfig):
    """128 x 128 weight blocks, dynamic per-token-group (1 x 128) activation scales."""

    def __init__(self, block: tuple[int, int] = SUPPORTED_BLOCK, online: bool = False):
        self.name = "fp8 (block-wise)"
        self.block = tuple(block)
        self.online = online

    def linear_method(self) -> LinearMethod:
        return Fp8BlockLinearMethod(self)

    def unquantized_method(self) -> LinearMethod:
        return Fp8BlockDequantMethod(self)

    def describe(self) -> str:
        bn, bk = self.block
        src = ", quantized at load from dummy weights" if self.online else ""
        return (
            f"fp8 (e4m3 weights with {bn}x{bk} block scales, dynamic per-token-group 1x{bk} activation "
            f"scales{src})"
        )


def _output_shards(layer: nn.Module) -> list[int]:
    """This rank's output features of each merged projection (q/k/v, gate/up), or of the one projection."""
    if hasattr(layer, "output_sizes"):  # MergedColumnParallelLinear
        return [size // layer.tp_size for size in layer.output_sizes]
    if hasattr(layer, "num_kv_heads"):  # QKVParallelLinear
        kv = layer.num_kv_heads * layer.head_dim
        return [layer.num_heads * layer.head_dim, kv, kv]
    return [layer.out_features]


def check_block_alignment(layer: nn.Module, in_features: int, out_features: int, block) -> None:
    """A rank's share of the weight must start (and, but for the last shard of an unsplit layer, end) on a
    block boundary, or its scales would belong to another rank's rows too."""
    bn, bk = block
    tp = getattr(layer, "tp_size", 1)
    name = type(layer).__name__
    if getattr(layer, "input_is_parallel", False) and tp > 1 and in_features % bk:
        raise ValueError(
            f"fp8 block-wise {name}: {in_features} input features per rank at tensor parallel {tp} split a "
            f"{bn}x{bk} weight block"
        )
    shards = _output_shards(layer)
    column_split = tp > 1 and getattr(layer, "output_is_parallel", False)
    must_align = shards if column_split else shards[:-1]  # unsplit: the last shard may end mid-block
    for size in must_align:
        if size % bn:
            where = f"per rank at tensor parallel {tp}" if column_split else "in one merged projection"
            raise ValueError(
                f"fp8 block-wise {name}: a shard of {size} output features {where} does not hold whole "
                f"{bn}x{bk} weight blocks"
            )


def _scale_param(layer: nn.Module, in_features: int, out_features: int, block, **kw) -> None:
    bn, bk = block
    new_param(
        layer,
        "weight_scale_inv",
        (math.ceil(out_features / bn), math.ceil(in_features / bk)),
        torch.float32,
        output_dim=0,
        output_pack=bn,
        input_dim=1,
        input_pack=bk,
        **kw,
    )


class Fp8BlockLinearMethod(LinearMethod):
    name = "fp8_block"

    def __init__(self, config: Fp8BlockConfig):
        self.config = config

    def create_weights(self, layer, in_features, out_features, dtype):
        c = self.config
        check_block_alignment(layer, in_features, out_features, c.block)
        fp8_weight_param(layer, in_features, out_features, dtype, c.online)
        if not c.online:
            _scale_param(layer, in_features, out_features, c.block)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.config.online:
            weight, scale_inv = quantize_fp8_blockwise(layer.weight.data, self.config.block)
            replace_param(layer, "weight", weight)
            replace_param(layer, "weight_scale_inv", scale_inv)

    def apply(self, layer, x, bias):
        return fp8_block_linear(x, layer.weight, layer.weight_scale_inv, self.config.block, bias)


class Fp8BlockDequantMethod(UnquantizedLinearMethod):
    """A 16-bit layer under a block-fp8 checkpoint: its fp8 weight (cast exactly into the 16-bit parameter
    while loading) times its block scales, once, after loading; without scales the weight was stored 16-bit."""

    def __init__(self, config: Fp8BlockConfig):
        self.config = config

    def create_weights(self, layer, in_features, out_features, dtype):
        super().create_weights(layer, in_features, out_features, dtype)
        if not self.config.online:
            check_block_alignment(layer, in_features, out_features, self.config.block)
            _scale_param(layer, in_features, out_features, self.config.block, optional=True, fill=math.nan)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.config.online:
            return
        scale = layer.weight_scale_inv.data
        loaded = ~torch.isnan(scale)
        if bool(loaded.any()):
            if not bool(loaded.all()):
                raise ValueError("weight_scale_inv covers only part of the weight (a merged shard lacks it)")
            w = layer.weight.data
            w.copy_(dequantize_fp8_blockwise(w, scale, self.config.block, w.dtype))
        replace_param(layer, "weight_scale_inv", None)
