"""The MLA prefill workspace: the buffers that bound the expanded-context memory of a prefill step.

Expanding a context through kv_b_proj costs H * (N + V) numbers per token (8 KB for DeepSeek-V2-Lite in bf16,
64 KB for V3's 128 heads at TP=1: ~2 GB for a 32k-token context), and a cached prefix is only read, so the
engine's memory profile (a step of max_num_batched_tokens new tokens) never sees it. kernels/mla_prefill.py
instead expands a step's context chunk_tokens rows at a time into these buffers, allocated once when the
model runner starts (before the profile: the profile counts them) and reused by every layer and step:

  latents   [W, R + P]     the gathered cache rows of one chunk (W = chunk_tokens)
  kv        [W, H, N + V]  their expansion
  acc       [T, H, V] fp32 the running merge of the chunks' outputs (T = max_num_batched_tokens)
  part      [T, H, V]      one chunk's output
  acc_lse, part_lse [T, H] fp32: their log-sum-exps

W = max(max_num_batched_tokens, MIN_CHUNK_TOKENS): a step's own new tokens never need more than one chunk's
worth of room for themselves, and a context up to 8k tokens (most prompts) runs in one chunk without a merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_CHUNK_TOKENS = 8192


def workspace_chunk_tokens(max_num_batched_tokens: int, min_chunk_tokens: int = MIN_CHUNK_TOKENS) -> int:
    """Context rows expanded at once (one chunk) for a step budget of max_num_batched_tokens."""
    return max(max_num_batched_tokens, min_chunk_tokens)


@dataclass(frozen=True)
class WorkspaceShape:
    """What sizes the workspace: the chunk and step sizes and this rank's MLA dims."""

    chunk_tokens: int  # W
    max_query_tokens: int  # T: rows of the merge buffers
    num_heads: int  # this rank's heads
    nope: int
    rope: int
    v_dim: int
    rank: int  # kv_lora_rank
    dtype: torch.dtype

    def nbytes(self) -> int:
        """Bytes of all the buffers: what the memory profile sees allocated."""
        elem = torch.empty(0, dtype=self.dtype).element_size()
        w, t, h = self.chunk_tokens, self.max_query_tokens, self.num_heads
        expand = w * (self.rank + self.rope) * elem + w * h * (self.nope + self.v_dim) * elem
        merge = t * h * self.v_dim * (4 + elem) + 2 * t * h * 4
        return expand + merge


class MLAPrefillWorkspace:
    """The buffers of WorkspaceShape, allocated once; one per model runner, shared by its MLA layers."""

    def __init__(self, shape: WorkspaceShape, device: torch.device | str):
        self.shape = shape
        w, t, h, dt = shape.chunk_tokens, shape.max_query_tokens, shape.num_heads, shape.dtype
        self.latents = torch.empty(w, shape.rank + shape.rope, dtype=dt, device=device)
        self.kv = torch.empty(w, h, shape.nope + shape.v_dim, dtype=dt, device=device)
        self.acc = torch.empty(t, h, shape.v_dim, dtype=torch.float32, device=device)
        self.part = torch.empty(t, h, shape.v_dim, dtype=dt, device=device)
        self.acc_lse = torch.empty(t, h, dtype=torch.float32, device=device)
        self.part_lse = torch.empty(t, h, dtype=torch.float32, device=device)

    @property
    def chunk_tokens(self) -> int:
        return self.shape.chunk_tokens

    @property
    def nbytes(self) -> int:
        return sum(
            b.numel() * b.element_size()
            for b in (self.latents, self.kv, self.acc, self.part, self.acc_lse, self.part_lse)
        )

    def merge_buffers(
        self, num_tokens: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(acc, acc_lse, part, part_lse) for a step of num_tokens rows: views of the workspace, or fresh
        tensors for a step larger than it was sized for (only outside the engine: the scheduler's budget
        bounds a step)."""
        if num_tokens <= self.shape.max_query_tokens and dtype == self.part.dtype:
            return (
                self.acc[:num_tokens],
                self.acc_lse[:num_tokens],
                self.part[:num_tokens],
                self.part_lse[:num_tokens],
            )
        h, v, dev = self.shape.num_heads, self.shape.v_dim, self.acc.device
        return (
            torch.empty(num_tokens, h, v, dtype=torch.float32, device=dev),
            torch.empty(num_tokens, h, dtype=torch.float32, device=dev),
            torch.empty(num_tokens, h, v, dtype=dtype, device=dev),
            torch.empty(num_tokens, h, dtype=torch.float32, device=dev),
        )
