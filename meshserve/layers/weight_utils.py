"""Reading parts of checkpoint tensors: works on torch tensors and on safetensors' lazy slices alike,
so a tensor-parallel rank reads only its own shard from disk."""

from __future__ import annotations

import torch


def weight_shape(loaded) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def narrow_weight(loaded, dim: int, start: int, size: int) -> torch.Tensor:
    """loaded[..., start:start+size (along dim), ...] as a tensor."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = (slice(None),) * dim + (slice(start, start + size),)
    return loaded[index]


def full_weight(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[...]  # (... also reads 0-dim scalars)
