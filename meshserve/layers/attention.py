"""Attention over the paged KV cache, dispatched to a backend.

The layer is the only writer of its KV cache, and it writes through its backend: either the plain
`write_kv` of this step's K/V, or (when the backend selection turns the fused prologue on) the backend's
`write_qkv`, which splits, norms and rotates q/k and writes K/V in one kernel. Then it attends. In
decode-only steps the backend's `attend_qkv` may do both in the decode attention launch
(MESHSERVE_DECODE_FUSED_PROLOGUE, opt-in). Backends share one signature: the plain torch reference ("torch":
CPU, and the oracle for kernels) and the Triton kernels ("triton", GPU). Which one a layer gets is decided in
layers/backend_selection.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.kernels.attention_tile_config import DECODE_SPLIT_TOKENS


class AttentionBackend(Protocol):
    """Writes K/V into a layer's cache and attends over it. A backend that serves the fused prologue also
    has write_qkv(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps, kv_cache,
    slot_mapping, num_heads, num_kv_heads, k_scale, v_scale) -> q, and one that serves it inside decode attention
    has attend_qkv(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps, kv_cache, meta, scale,
    sliding_window, num_heads, num_kv_heads, k_scale, v_scale) -> out (see TritonAttentionBackend)."""

    name: str

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None: ...

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
               sliding_window: int | None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor: ...


class TorchAttentionBackend:
    """Per-sequence SDPA over gathered blocks: simple, exact, slow."""

    name = "torch"

    def write_kv(self, key, value, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        from meshserve.kernels.attention_ref import write_kv_ref

        write_kv_ref(key, value, kv_cache, slot_mapping, k_scale, v_scale)

    def attend(self, query, kv_cache, meta, scale, sliding_window, k_scale=1.0, v_scale=1.0):
        from meshserve.kernels.attention_ref import paged_attention_ref

        return paged_attention_ref(query, kv_cache, meta, scale, sliding_window, k_scale, v_scale)


def make_attention_backend(name: str, decode_inline_reduce: bool = False,
                           decode_grid_tile: str = "auto", decode_fp8_path: str = "words",
                           decode_grid_tile_shape: tuple[int, int, int] | None = None,
                           decode_balanced: int = 0, decode_split_tokens: int = DECODE_SPLIT_TOKENS,
                           decode_min_splits: int = 1) -> AttentionBackend:
    """The backend called `name` (torch or triton); layers/backend_selection.py decides which (and whether the
    Triton decode reduces its splits inline, which caches' large decode grids take smaller CTAs and how it reads an
    fp8 cache)."""
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        from meshserve.kernels.triton_attention import TritonAttentionBackend

        return TritonAttentionBackend(inline_reduce=decode_inline_reduce, grid_tile=decode_grid_tile,
                                      fp8_path=decode_fp8_path, grid_tile_shape=decode_grid_tile_shape,
                                      balanced=decode_balanced, split_tokens=decode_split_tokens,
                                      min_splits=decode_min_splits)
    raise ValueError(f"unknown attention backend {name!r} (torch, triton)")


class Attention(nn.Module):
    """Paged attention for one layer.

    Holds the layer's KV cache and its backend, both bound by the model runner (the backend and the
    fused-prologue switch from the backend selection, the cache once the pool exists). Every write to the
    cache goes through the backend.
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.kv_cache: torch.Tensor | None = None
        self.backend: AttentionBackend = TorchAttentionBackend()
        self.fused_prologue = False  # the backend's write_qkv serves forward_qkv
        # decode-only steps: the backend's attend_qkv (the prologue inside the decode attention launch)
        self.decode_fused_prologue = False
        # ... only where that launch has at least this many KV splits per (sequence, KV head) (1: always; 2:
        # MESHSERVE_DECODE_FUSED_PROLOGUE=split, _fuses_decode_prologue says why)
        self.decode_fused_min_splits = 1
        # an fp8 cache holds K / k_scale and V / v_scale (1.0, or the checkpoint's: quantization/kv_scales.py)
        self.k_scale, self.v_scale = 1.0, 1.0
        # called once this step's K/V are in the cache (disaggregation sends the layer's blocks from there)
        self.after_kv_write: Callable[[], None] | None = None

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """This layer's cache tensor: K and V per KV head (MLA layers hold one latent instead)."""
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    @property
    def can_fuse_prologue(self) -> bool:
        """Whether forward_qkv may be used now: the prologue is selected and the cache is bound."""
        return self.fused_prologue and self.kv_cache is not None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H*D]."""
        if self.kv_cache is None:
            raise RuntimeError("attention layer has no KV cache bound")
        self.backend.write_kv(k, v, self.kv_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        if self.after_kv_write is not None:
            self.after_kv_write()
        return self.forward_cached(q, meta)

    def forward_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, rotary_emb, q_norm, k_norm,
                    meta: AttentionMetadata) -> torch.Tensor:
        """The fused path of forward: qkv [T, (H + 2 Hkv) * D] straight from the projection; the backend
        splits it, applies q_norm/k_norm (RMSNorm per head, or None), rotary_emb's cos/sin and writes K/V in
        one kernel, with the same roundings as the separate steps (an fp8 cache scaled as write_kv does).
        -> [T, H*D]. A decode-only step with decode_fused_prologue goes through the backend's attend_qkv
        instead: the same work inside the decode attention launch (kernels/triton_decode_fused.py)."""
        norm_w = (None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight)
        eps = q_norm.eps if q_norm is not None else 0.0
        if self._fuses_decode_prologue(meta, qkv.dtype):
            out = self.backend.attend_qkv(qkv, positions, rotary_emb.cos_cache, rotary_emb.sin_cache, *norm_w, eps,
                                          self.kv_cache, meta, self.scale, self.sliding_window, self.num_heads,
                                          self.num_kv_heads, self.k_scale, self.v_scale)
            if self.after_kv_write is not None:  # K/V were written inside that launch: in the cache by now
                self.after_kv_write()
            return out.flatten(1)
        q = self.backend.write_qkv(qkv, positions, rotary_emb.cos_cache, rotary_emb.sin_cache,
                                   *norm_w, eps, self.kv_cache, meta.slot_mapping,
                                   self.num_heads, self.num_kv_heads, self.k_scale, self.v_scale)
        if self.after_kv_write is not None:
            self.after_kv_write()
        return self.forward_cached(q, meta)

    def _fuses_decode_prologue(self, meta: AttentionMetadata, dtype: torch.dtype) -> bool:
        """A decode-only step (one token per sequence; not a captured mixed step, whose trailing tokens belong
        to no sequence) with the switch on and a backend that has attend_qkv, whose decode launch (for
        activations of `dtype`) has at least decode_fused_min_splits KV splits. Why a split rule: with one
        split every program of the fused launch is its KV head's writer and runs the whole prologue (q and all
        KV heads' norm + rotary, the write, a CTA barrier) before its first KV tile, in a kernel of two CTAs per
        SM, so that latency is paid once per program (per wave at large batch) instead of once per layer by the
        prologue kernel; with splits only the last (shortest) split writes, behind the others' tiles. The count
        comes from host numbers only (the batch, meta.max_seq_len: a graph's bound), so a graph bakes it in."""
        if not (self.decode_fused_prologue and meta.max_query_len == 1 and not meta.graph_bound
                and hasattr(self.backend, "attend_qkv")):
            return False
        if self.decode_fused_min_splits <= 1:
            return True
        splits = self.backend.decode_splits(meta.seq_lens.shape[0], self.num_kv_heads, self.head_dim, dtype,
                                            meta.max_seq_len, self.kv_cache.device)
        return splits >= self.decode_fused_min_splits

    def forward_cached(self, q: torch.Tensor, meta: AttentionMetadata):
        """Attend when this step's K/V are already in the cache."""
        out = self.backend.attend(q, self.kv_cache, meta, self.scale, self.sliding_window, self.k_scale,
                                  self.v_scale)
        return out.flatten(1)
