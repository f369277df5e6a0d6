"""The weight format of a layer's routed experts (layers/fused_moe.py): 16-bit, or FP8 in one of two layouts.

  per-channel fp8    `--quantization fp8` on a 16-bit checkpoint: each expert's w13 / w2 are loaded 16-bit and
                     quantized per output channel after loading (as the dense online path does):
                     w13_weight_scale [E, 2*I], w2_weight_scale [E, H]; activations per token at run time
  block-wise fp8     HF "fp8" with weight_block_size [128, 128] (DeepSeek-V3/R1, Qwen3-MoE FP8): each expert's
                     gate/up/down weight fp8 with weight_scale_inv [ceil(N/128), ceil(K/128)], stacked into
                     w13_weight_scale_inv [E, 2*ceil(I/128), ceil(H/128)] (gate's row blocks, then up's) and
                     w2_weight_scale_inv [E, ceil(H/128), ceil(I/128)]; activations per token and 128 features.
                     Dummy weights under that config are quantized so at load.
Tensor parallel splits each expert's width, and with it the scales' blocks: every rank's width must be whole
128-row blocks (expert parallel keeps experts whole, so any width loads). kernels/moe_ref.py has the math.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from meshserve.kernels.fp8_block_ref import quantize_fp8_blockwise
from meshserve.kernels.quant_ref import FP8_DTYPE, quantize_fp8_per_channel
from meshserve.layers.quantization.base import QuantConfig, replace_param
from meshserve.layers.quantization.fp8 import Fp8Config
from meshserve.layers.quantization.fp8_block import Fp8BlockConfig
from meshserve.layers.quantization.int4 import Int4Config


class MoEWeightFormat:
    """16-bit experts: creates w13_weight [E, 2*I, H] and w2_weight [E, H, I] in the model dtype."""

    name = "unquantized"
    block: tuple[int, int] | None = None

    def weight_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def check_width(self, width: int, tp_size: int, expert_parallel: bool) -> None:
        """A one-line error when a tensor-parallel split of the experts' width cuts a scale block."""

    def scale_shapes(self, experts: int, width: int, hidden: int) -> dict[str, tuple[int, ...]]:
        """name -> shape of the scale tensors the checkpoint holds beside w13_weight / w2_weight."""
        return {}

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Quantize loaded 16-bit experts (the online formats)."""

    def scales(self, layer: nn.Module) -> dict:
        """fused_experts' scale arguments."""
        return {}


class Fp8PerChannelMoE(MoEWeightFormat):
    """Online fp8: 16-bit experts quantized per output channel after loading."""

    name = "fp8"

    def process_weights_after_loading(self, layer):
        for prefix in ("w13", "w2"):
            w = getattr(layer, f"{prefix}_weight").data
            q, scale = quantize_fp8_per_channel(w.reshape(-1, w.shape[-1]))
            replace_param(layer, f"{prefix}_weight", q.view(w.shape))
            replace_param(layer, f"{prefix}_weight_scale", scale.view(w.shape[0], w.shape[1]))

    def scales(self, layer):
        return {"w13_scale": layer.w13_weight_scale, "w2_scale": layer.w2_weight_scale}


class Fp8BlockMoE(MoEWeightFormat):
    """Block-wise fp8 experts: the checkpoint's fp8 weights and scales as stored (online: quantized at load)."""

    name = "fp8 (block-wise)"

    def __init__(self, config: Fp8BlockConfig):
        self.block, self.online = tuple(config.block), config.online

    def weight_dtype(self, dtype):
        return dtype if self.online else FP8_DTYPE

    def check_width(self, width, tp_size, expert_parallel):
        bn, bk = self.block
        if self.online or expert_parallel or tp_size == 1 or (width % bn == 0 and width % bk == 0):
            return
        raise ValueError(
            f"fp8 block-wise MoE experts: a width of {width} per rank at tensor parallel {tp_size} "
            f"splits a {bn}x{bk} weight block (expert parallel keeps experts whole)"
        )

    def scale_shapes(self, experts, width, hidden):
        if self.online:
            return {}
        bn, bk = self.block
        return {
            "w13_weight_scale_inv": (experts, 2 * math.ceil(width / bn), math.ceil(hidden / bk)),
            "w2_weight_scale_inv": (experts, math.ceil(hidden / bn), math.ceil(width / bk)),
        }

    def process_weights_after_loading(self, layer):
        if not self.online:
            for name in ("w13_weight_scale_inv", "w2_weight_scale_inv"):
                missing = torch.isnan(getattr(layer, name)).flatten(1).any(1).nonzero().flatten().tolist()
                if missing:
                    raise ValueError(f"the checkpoint lacks the scales of local expert {missing[0]} ({name})")
            return
        w13, w2 = layer.w13_weight.data, layer.w2_weight.data
        width = w2.shape[2]
        gate = [quantize_fp8_blockwise(w, self.block) for w in w13[:, :width]]
        up = [quantize_fp8_blockwise(w, self.block) for w in w13[:, width:]]
        down = [quantize_fp8_blockwise(w, self.block) for w in w2]
        replace_param(layer, "w13_weight", torch.stack([torch.cat([g[0], u[0]]) for g, u in zip(gate, up)]))
        replace_param(
            layer, "w13_weight_scale_inv", torch.stack([torch.cat([g[1], u[1]]) for g, u in zip(gate, up)])
        )
        replace_param(layer, "w2_weight", torch.stack([q for q, _ in down]))
        replace_param(layer, "w2_weight_scale_inv", torch.stack([s for _, s in down]))

    def scales(self, layer):
        return {
            "w13_scale": layer.w13_weight_scale_inv,
            "w2_scale": layer.w2_weight_scale_inv,
            "block": self.block,
        }


def moe_weight_format(config: QuantConfig | None) -> MoEWeightFormat:
    """The experts' format under the model's quantization; a one-line error for checkpoints whose quantized
    experts have no path here."""
    if isinstance(config, Fp8BlockConfig):
        return Fp8BlockMoE(config)
    if isinstance(config, Fp8Config):
        if config.online:
            return Fp8PerChannelMoE()
        raise ValueError(
            f"{config.name} MoE experts (per-tensor / per-channel fp8 checkpoints) are not "
            "supported (block-wise fp8 checkpoints and online --quantization fp8 are)"
        )
    if isinstance(config, Int4Config) and not config.online:
        raise ValueError(f"{config.name} int4 MoE experts are not supported (fp8 experts are)")
    return MoEWeightFormat()  # (int4 dummy weights: the dense layers are int4, the experts stay 16-bit)
