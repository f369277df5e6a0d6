"""Attention over the paged KV cache, dispatched to a backend.

The layer writes this step's K/V into its cache slots and then attends. Backends share one signature:
the plain torch reference (CPU, and the oracle for kernels) and, on GPU, the Triton kernels.
"""

import torch
from torch import nn

from meshserve.kernels.attention_ref import paged_attention_ref, write_kv_ref
from meshserve.layers.attention_metadata import AttentionMetadata


class Attention(nn.Module):
    """Paged attention for one layer. `kv_cache` is bound by the model runner once the pool exists."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.kv_cache: torch.Tensor | None = None
        self.backend = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H*D]."""
        if self.kv_cache is None:
            raise RuntimeError("attention layer has no KV cache bound")
        write_kv_ref(k, v, self.kv_cache, meta.slot_mapping)
        out = paged_attention_ref(q, self.kv_cache, meta, self.scale, self.sliding_window)
        return out.flatten(1)
