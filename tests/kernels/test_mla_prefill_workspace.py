"""The MLA prefill workspace (kernels/mla_prefill_workspace.py): its size arithmetic is what it allocates (the
bytes the memory profile sees), the chunk size follows the step budget, and steps larger than it was sized
for get their own merge buffers."""

from __future__ import annotations

import torch

from meshserve.kernels.mla_prefill_workspace import (
    MIN_CHUNK_TOKENS,
    MLAPrefillWorkspace,
    WorkspaceShape,
    workspace_chunk_tokens,
)


def test_chunk_tokens_cover_the_step_budget():
    assert workspace_chunk_tokens(2048) == MIN_CHUNK_TOKENS == 8192
    assert workspace_chunk_tokens(16384) == 16384
    assert workspace_chunk_tokens(100, min_chunk_tokens=64) == 100


def test_nbytes_is_what_is_allocated():
    for dtype in (torch.float32, torch.bfloat16):
        shape = WorkspaceShape(48, 20, 3, 16, 8, 24, 32, dtype)
        ws = MLAPrefillWorkspace(shape, "cpu")
        assert shape.nbytes() == ws.nbytes
        assert ws.kv.shape == (48, 3, 40) and ws.latents.shape == (48, 40) and ws.acc.shape == (20, 3, 24)


def test_v2_lite_workspace_size():
    """DeepSeek-V2-Lite (16 heads, R 512, P 64, N 128, V 128) in bf16 at the default 8192-token budget: the
    8 KB/token expansion and 1.1 KB/token latents of an 8k chunk, the merge buffers of an 8k-token step."""
    shape = WorkspaceShape(workspace_chunk_tokens(8192), 8192, 16, 128, 64, 128, 512, torch.bfloat16)
    expand = 8192 * (16 * 256 * 2 + 576 * 2)
    merge = 8192 * 16 * (128 * 4 + 128 * 2 + 2 * 4)
    assert shape.nbytes() == expand + merge
    assert 165 * 2**20 < shape.nbytes() < 175 * 2**20  # ~170 MiB, whatever the context length


def test_merge_buffers_are_views_or_fresh_for_larger_steps():
    ws = MLAPrefillWorkspace(WorkspaceShape(16, 10, 2, 16, 8, 24, 32, torch.float32), "cpu")
    acc, _, part, part_lse = ws.merge_buffers(7, torch.float32)
    assert acc.data_ptr() == ws.acc.data_ptr() and acc.shape == (7, 2, 24) and part_lse.shape == (7, 2)
    acc, _, part, _ = ws.merge_buffers(11, torch.float32)
    assert acc.data_ptr() != ws.acc.data_ptr() and acc.shape == (11, 2, 24) and part.shape == (11, 2, 24)
