"""KV blocks copied by id in one pass: dst[l][:, dst_ids[i]] = src[l][:, src_ids[i]] for some layers' pools.

The ipc connector's scattered reads (meshserve/disagg/ipc_connector.py, BlockCopy) gathered the blocks into a
temporary and scattered them from it (index_select, index_copy_): every byte read twice and written twice, two
launches per layer. Here each program copies one chunk of one block's K or V of one layer straight from the
producer's pool into the consumer's, and one launch covers every layer of a read: the layers' base addresses come
from two pointer tables (PoolPointers, made once per pair of pools), so a 32-layer read is one launch, not 32 of
~0.1 ms of host time each (a 256-block read, 16 MiB a layer, ran slower than the gather that way on the H200).
Both pools on one device (two engines on one GPU, or a pool mapped on the consumer's device); every layer's pool
the same shape and dtype, [2, blocks, ...] with each block's elements dense (fits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from meshserve.host_lists import to_device

# The tile: tools/sweep_block_copy.py on an H200 (2026-12-03, Llama-3.1-8B blocks, 32 layers; 33 tiles): 4 KiB of a
# block per program on 8 warps (16 bytes a thread) was the fastest at 16, 256 and 512 blocks: 545 us for 1 GiB (1.97
# TB/s; torch's copy of the same bytes in one piece 2.07) against 575 us with 16 KiB on 4 warps, the first default
CHUNK_BYTES = 4096  # per program and block: a 32 KiB K block (Llama-3.1-8B, 16 tokens, bf16) in eight programs
PAIRS = 1  # blocks per program (a [PAIRS, CHUNK] tile: more bytes in flight per program, fewer programs)
NUM_WARPS = 8


@dataclass(frozen=True)
class CopyTile:
    """The kernel's tiling: bytes of a block per program, blocks per program, warps; MESHSERVE_BLOCK_COPY_TILE=
    "chunk_bytes,pairs,warps" overrides the default for A/Bs (tools/sweep_block_copy.py sweeps them)."""

    chunk_bytes: int = CHUNK_BYTES
    pairs: int = PAIRS
    num_warps: int = NUM_WARPS

    @classmethod
    def from_env(cls) -> CopyTile:
        spec = os.environ.get("MESHSERVE_BLOCK_COPY_TILE", "")
        if not spec:
            return cls()
        try:
            chunk_bytes, pairs, warps = (int(v) for v in spec.split(","))
        except ValueError:
            raise ValueError(f"MESHSERVE_BLOCK_COPY_TILE={spec!r}: expected chunk_bytes,pairs,warps") from None
        return cls(chunk_bytes, pairs, warps)


@triton.jit
def _copy_blocks_kernel(dst_bases_ptr, src_bases_ptr, dst_ids_ptr, src_ids_ptr, num_pairs, count_ptr, dst_kv_stride,
                        src_kv_stride, block_words, WORDS: tl.constexpr, CHUNK: tl.constexpr, PAIRS: tl.constexpr,
                        COUNTED: tl.constexpr):
    first, layer_kv, chunk = tl.program_id(0) * PAIRS, tl.program_id(1), tl.program_id(2)
    if COUNTED:  # (a graph's replay: the grid covers its bucket, the read's pair count is on the device)
        num_pairs = tl.load(count_ptr)
    layer, kv = layer_kv // 2, layer_kv % 2
    elem = tl.int32 if WORDS else tl.uint8
    dst = tl.load(dst_bases_ptr + layer).to(tl.pointer_type(elem))
    src = tl.load(src_bases_ptr + layer).to(tl.pointer_type(elem))
    pairs = first + tl.arange(0, PAIRS)
    ok = pairs < num_pairs
    d = tl.load(dst_ids_ptr + pairs, mask=ok, other=0).to(tl.int64)
    s = tl.load(src_ids_ptr + pairs, mask=ok, other=0).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = ok[:, None] & (offs < block_words)[None, :]
    x = tl.load(src + kv * src_kv_stride + s[:, None] * block_words + offs[None, :], mask=mask)
    tl.store(dst + kv * dst_kv_stride + d[:, None] * block_words + offs[None, :], x, mask=mask)


def fits(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether copy_blocks can take these pools: one device, one dtype and shape per block, blocks dense."""
    return (dst.device == src.device and dst.dtype == src.dtype and dst.shape[2:] == src.shape[2:]
            and dst[0, 0].is_contiguous() and src[0, 0].is_contiguous()
            and dst.stride(1) == dst[0, 0].numel() and src.stride(1) == src[0, 0].numel())


@dataclass(frozen=True)
class PoolPointers:
    """Two pools' layers as the kernel reads them: base addresses (int64, on the device), strides in words."""

    dst_bases: torch.Tensor
    src_bases: torch.Tensor
    dst_kv_stride: int
    src_kv_stride: int
    block_words: int
    words: bool  # 4-byte words (a block's bytes divisible by 4), else bytes

    @classmethod
    def of(cls, dst: list[torch.Tensor], src: list[torch.Tensor]) -> PoolPointers:
        """For pools that fit(), layer by layer; each side's layers share one shape (the engine's pools do)."""
        words = dst[0][0, 0].numel() * dst[0].element_size() % 4 == 0
        unit = 4 if words else 1
        size = dst[0].element_size()
        device = dst[0].device

        def bases(layers: list[torch.Tensor]) -> torch.Tensor:
            return to_device([t.data_ptr() for t in layers], device)

        return cls(bases(dst), bases(src), dst[0].stride(0) * size // unit, src[0].stride(0) * size // unit,
                   dst[0][0, 0].numel() * size // unit, words)


def copy_blocks(pointers: PoolPointers, dst_ids: torch.Tensor, src_ids: torch.Tensor,
                layers: range | None = None, tile: CopyTile | None = None, pair_count: torch.Tensor | None = None) -> None:
    """dst[l][:, dst_ids] = src[l][:, src_ids] for l in layers (a contiguous range; None: all of them); the ids
    int64 tensors on the pools' device. pair_count: a one-element int64 device tensor, the pairs to copy of the ids'
    (the rest are not read): the launch then depends on no host value but the ids' capacity (a CUDA graph's)."""
    n = dst_ids.numel()
    first, count = (0, pointers.dst_bases.numel()) if layers is None else (layers.start, len(layers))
    if n == 0 or count == 0:
        return
    tile = tile or _TILE
    chunk = min(tile.chunk_bytes // (4 if pointers.words else 1), triton.next_power_of_2(pointers.block_words))
    grid = (triton.cdiv(n, tile.pairs), 2 * count, triton.cdiv(pointers.block_words, chunk))
    dst_bases, src_bases = pointers.dst_bases, pointers.src_bases
    if first:  # (a view per launch costs host time: only for a layer range past the first)
        dst_bases, src_bases = dst_bases[first:], src_bases[first:]
    _copy_blocks_kernel[grid](dst_bases, src_bases, dst_ids, src_ids, n, dst_ids if pair_count is None else pair_count,
                              pointers.dst_kv_stride, pointers.src_kv_stride, pointers.block_words,
                              WORDS=pointers.words, CHUNK=chunk, PAIRS=tile.pairs, COUNTED=pair_count is not None,
                              num_warps=tile.num_warps)


_TILE = CopyTile.from_env()
