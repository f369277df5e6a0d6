"""KV blocks copied by id in one pass: dst[:, dst_ids[i]] = src[:, src_ids[i]] for one layer's pool.

The ipc connector's scattered reads (meshserve/disagg/ipc_connector.py, BlockCopy) gathered the blocks into a
temporary and scattered them from it (index_select, index_copy_): every byte read twice and written twice. Here
each program copies one chunk of one block's K or V straight from the producer's pool into the consumer's, so a
read moves each byte once. Both pools on one device (two engines on one GPU, or a pool mapped on the consumer's
device); blocks contiguous within a layer ([2, blocks, ...] with the block's elements dense), the shapes and dtype
equal (checked by the connector when it maps the peer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK_BYTES = 16384  # per program: a 32 KiB K block (Llama-3.1-8B, 16 tokens, bf16) in two programs


@triton.jit
def _copy_blocks_kernel(dst_ptr, src_ptr, dst_ids_ptr, src_ids_ptr, dst_kv_stride, src_kv_stride, block_words,
                        CHUNK: tl.constexpr):
    pair, kv, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = tl.load(dst_ids_ptr + pair).to(tl.int64)
    s = tl.load(src_ids_ptr + pair).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_words
    x = tl.load(src_ptr + kv * src_kv_stride + s * block_words + offs, mask=mask)
    tl.store(dst_ptr + kv * dst_kv_stride + d * block_words + offs, x, mask=mask)


def _words(t: torch.Tensor) -> torch.Tensor:
    """The pool as 4-byte words when its blocks allow (fewer, wider loads), else as bytes."""
    flat = t.view(torch.uint8)
    return flat.view(torch.int32) if flat.shape[-1] % 4 == 0 else flat


def fits(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether copy_blocks can take these pools: one device, one dtype and shape per block, blocks dense."""
    return (dst.device == src.device and dst.dtype == src.dtype and dst.shape[2:] == src.shape[2:]
            and dst[0, 0].is_contiguous() and src[0, 0].is_contiguous()
            and dst.stride(1) == dst[0, 0].numel() and src.stride(1) == src[0, 0].numel())


def copy_blocks(dst: torch.Tensor, src: torch.Tensor, dst_ids: torch.Tensor, src_ids: torch.Tensor) -> None:
    """dst[:, dst_ids] = src[:, src_ids]; dst and src are one layer's pools [2, blocks, ...] on one device,
    contiguous, same dtype and block shape; the ids int64 tensors on that device."""
    n = dst_ids.numel()
    if n == 0:
        return
    dst_w, src_w = _words(dst), _words(src)
    block_words = dst_w[0, 0].numel()
    chunk = CHUNK_BYTES // dst_w.element_size()
    grid = (n, 2, triton.cdiv(block_words, chunk))
    _copy_blocks_kernel[grid](dst_w, src_w, dst_ids, src_ids, dst_w.stride(0), src_w.stride(0), block_words,
                              CHUNK=chunk, num_warps=4)
