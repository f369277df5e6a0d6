"""Gathering and scattering blocks of a paged KV pool, one layer at a time (what a connector moves).

A layer's pool tensor is [2, num_blocks, block_size, kv_heads, head_dim] (kv_pool.py); the blocks of one
request, in order, gathered from it form a contiguous [2, n, block_size, kv_heads, head_dim] tensor: the unit
sent per layer. Block ids differ between the two engines; the order (the request's block table) is shared.
"""

from __future__ import annotations

import torch


def layer_block_shape(kv_layer: torch.Tensor, num_blocks: int) -> tuple[int, ...]:
    """Shape of num_blocks gathered blocks of one layer."""
    return (kv_layer.shape[0], num_blocks, *kv_layer.shape[2:])


def gather_layer(kv_layer: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """The blocks block_ids of one layer, in that order, as a new contiguous tensor."""
    idx = torch.tensor(block_ids, dtype=torch.long, device=kv_layer.device)
    return kv_layer.index_select(1, idx).contiguous()


def scatter_layer(kv_layer: torch.Tensor, block_ids: list[int], data: torch.Tensor) -> None:
    """Write gathered blocks (gather_layer's layout) into block_ids of one layer."""
    idx = torch.tensor(block_ids, dtype=torch.long, device=kv_layer.device)
    data = data.to(kv_layer.device, non_blocking=True)
    if (
        kv_layer.dtype == torch.float8_e4m3fn
    ):  # an fp8 cache: CPU torch has no fp8 index_copy_, move the bytes
        kv_layer, data = kv_layer.view(torch.uint8), data.view(torch.uint8)
    kv_layer.index_copy_(1, idx, data)


def block_bytes(kv_tensors: list[torch.Tensor]) -> int:
    """Bytes of one block over every layer."""
    return sum(t[:, 0].numel() * t.element_size() for t in kv_tensors)
