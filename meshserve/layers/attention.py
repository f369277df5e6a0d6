"""Attention over the paged KV cache, dispatched to a backend.

The layer writes this step's K/V into its cache slots and then attends. Backends share one signature:
the plain torch reference ("torch": CPU, and the oracle for kernels) and the Triton kernels ("triton", GPU).
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
from torch import nn

from meshserve.layers.attention_metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None: ...

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
               sliding_window: int | None) -> torch.Tensor: ...


class TorchAttentionBackend:
    """Per-sequence SDPA over gathered blocks: simple, exact, slow."""

    name = "torch"

    def write_kv(self, key, value, kv_cache, slot_mapping):
        from meshserve.kernels.attention_ref import write_kv_ref

        write_kv_ref(key, value, kv_cache, slot_mapping)

    def attend(self, query, kv_cache, meta, scale, sliding_window):
        from meshserve.kernels.attention_ref import paged_attention_ref

        return paged_attention_ref(query, kv_cache, meta, scale, sliding_window)


def get_attention_backend(device: torch.device, name: str | None = None) -> AttentionBackend:
    """The backend for a device: Triton on CUDA, torch elsewhere; MESHSERVE_ATTENTION_BACKEND overrides."""
    name = name or os.environ.get("MESHSERVE_ATTENTION_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        from meshserve.kernels.triton_attention import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r} (torch, triton)")


class Attention(nn.Module):
    """Paged attention for one layer. The model runner binds `kv_cache` and `backend` once the pool exists."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.kv_cache: torch.Tensor | None = None
        self.backend: AttentionBackend = TorchAttentionBackend()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H*D]."""
        if self.kv_cache is None:
            raise RuntimeError("attention layer has no KV cache bound")
        self.backend.write_kv(k, v, self.kv_cache, meta.slot_mapping)
        return self.forward_cached(q, meta)

    def forward_cached(self, q: torch.Tensor, meta: AttentionMetadata):
        """Attend when this step's K/V are already in the cache (a fused prologue wrote them)."""
        out = self.backend.attend(q, self.kv_cache, meta, self.scale, self.sliding_window)
        return out.flatten(1)
