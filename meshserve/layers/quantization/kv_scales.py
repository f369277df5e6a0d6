"""KV-cache scales stored in checkpoints: `model.layers.N.self_attn.k_scale` / `v_scale` (compressed-tensors'
kv_cache_scheme, vLLM's FP8 checkpoints). They belong to the layer's Attention module, which divides K/V by
them when writing an fp8 cache and multiplies when reading. One scale per tensor: a per-head checkpoint scale
is reduced to its largest value (never clips; e4m3's relative precision does not depend on the scale within its
normal range, so the other heads lose nothing measurable: QUANTIZATION.md "fp8 KV scales: one per layer or one
per KV head", tools/kv_scale_granularity.py)."""

from __future__ import annotations

from torch import nn

from meshserve.layers.attention import Attention
from meshserve.layers.weight_utils import full_weight

KV_SCALE_NAMES = ("k_scale", "v_scale")


def is_kv_scale(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in KV_SCALE_NAMES


def load_kv_scale(model: nn.Module, name: str, loaded) -> None:
    """Set the attention layer's k_scale / v_scale from the checkpoint tensor called name."""
    owner, which = name.rsplit(".", 1)
    module = model.get_submodule(owner)
    attn = module if isinstance(module, Attention) else getattr(module, "attn", None)
    if not isinstance(attn, Attention):
        msg = f"{name} is a KV-cache scale but {owner} has no attention layer"
        raise ValueError(msg)  # noqa: TRY004  (a checkpoint error, reported as one)
    value = float(full_weight(loaded).float().max())
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    setattr(attn, which, value)
