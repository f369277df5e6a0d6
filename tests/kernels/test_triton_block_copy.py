"""kernels/triton_block_copy.py against the indexing it replaces (Triton's interpreter on CPU; sm_90 compile)."""

from __future__ import annotations

import pytest
import torch

from meshserve.kernels.triton_block_copy import copy_blocks, fits
from tests.kernels.sm90 import COMPILE_SM90_PRELUDE, assert_compiles_for_sm90


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8])
def test_copies_scattered_blocks_like_index_copy(dtype):
    torch.manual_seed(0)
    shape = (2, 24, 4, 2, 6)  # [K/V, blocks, block size, kv heads, head dim]: 96 bytes a bf16 block
    src = (torch.randn(shape) * 50).to(dtype)
    dst = torch.zeros(2, 17, 4, 2, 6, dtype=dtype)
    src_ids, dst_ids = torch.tensor([5, 0, 23, 7, 8]), torch.tensor([16, 3, 0, 9, 4])
    expected = dst.clone()
    expected[:, dst_ids] = src[:, src_ids]
    assert fits(dst, src)
    copy_blocks(dst, src, dst_ids, src_ids)
    assert torch.equal(dst, expected)


def test_pools_it_cannot_take():
    pool = torch.zeros(2, 8, 4, 2, 6)
    assert not fits(pool, pool.to(torch.float16))  # dtypes differ
    assert not fits(pool, torch.zeros(2, 8, 4, 2, 8))  # block shapes differ
    assert not fits(pool[:, :, :2], pool[:, :, :2])  # blocks not dense


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_gpu_copies_llama_blocks_like_index_copy(dtype):
    """Llama-3.1-8B's block (16 tokens x 8 KV heads x 128) in pools of 1,024 and 800 blocks, 300 scattered ids."""
    g = torch.Generator().manual_seed(1)
    src = torch.randn(2, 1024, 16, 8, 128, generator=g).to("cuda", dtype)
    dst = torch.zeros(2, 800, 16, 8, 128, device="cuda", dtype=dtype)
    src_ids = torch.randperm(1024, generator=g)[:300].cuda()
    dst_ids = torch.randperm(800, generator=g)[:300].cuda()
    expected = dst.view(torch.uint8).clone()
    expected[:, dst_ids] = src.view(torch.uint8)[:, src_ids]
    copy_blocks(dst, src, dst_ids, src_ids)
    assert torch.equal(dst.view(torch.uint8), expected)


_SCRIPT = COMPILE_SM90_PRELUDE + """
from meshserve.kernels.triton_block_copy import _copy_blocks_kernel
sig = {"dst_ptr": "*i32", "src_ptr": "*i32", "dst_ids_ptr": "*i64", "src_ids_ptr": "*i64"}
compile_sm90(_copy_blocks_kernel, sig, {"CHUNK": 4096}, 4, 1)
print("compiled")
"""


def test_kernel_compiles_for_sm90():
    assert_compiles_for_sm90(_SCRIPT)
