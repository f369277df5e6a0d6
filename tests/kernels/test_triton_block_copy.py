"""kernels/triton_block_copy.py against the indexing it replaces (Triton's interpreter on CPU; sm_90 compile; GPU)."""

from __future__ import annotations

import pytest
import torch

from meshserve.kernels.triton_block_copy import CopyTile, PoolPointers, copy_blocks, fits
from tests.kernels.sm90 import COMPILE_SM90_PRELUDE, assert_compiles_for_sm90


def _expected(dst: list[torch.Tensor], src: list[torch.Tensor], dst_ids, src_ids, layers) -> list[torch.Tensor]:
    out = [t.view(torch.uint8).clone() for t in dst]
    for layer in layers:
        out[layer][:, dst_ids] = src[layer].view(torch.uint8)[:, src_ids]
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8])
@pytest.mark.parametrize("layers", [None, range(1, 3), range(3, 4)])
@pytest.mark.parametrize("tile", [None, CopyTile(8, 2, 4), CopyTile(16, 4, 8)], ids=["default", "8B_2", "16B_4"])
def test_copies_scattered_blocks_of_the_layers_asked(dtype, layers, tile):
    """Four layers' pools; 3 x 2 x 2 elements a block (bf16: 24 bytes, words; uint8: 12 bytes, words; an odd
    block below takes the byte path); tiles of a block split over programs and of several blocks a program (5
    pairs: the last program's tile part empty)."""
    torch.manual_seed(0)
    src = [(torch.randn(2, 24, 3, 2, 2) * 50).to(dtype) for _ in range(4)]
    dst = [torch.zeros(2, 17, 3, 2, 2, dtype=dtype) for _ in range(4)]
    src_ids, dst_ids = torch.tensor([5, 0, 23, 7, 8]), torch.tensor([16, 3, 0, 9, 4])
    expected = _expected(dst, src, dst_ids, src_ids, range(4) if layers is None else layers)
    assert all(fits(d, s) for d, s in zip(dst, src))
    copy_blocks(PoolPointers.of(dst, src), dst_ids, src_ids, layers, tile)
    assert all(torch.equal(d.view(torch.uint8), e) for d, e in zip(dst, expected))


@pytest.mark.parametrize("tile", [None, CopyTile(8, 2, 4)], ids=["default", "8B_2"])
def test_a_pair_count_on_the_device_copies_only_the_first_pairs(tile):
    """A CUDA graph's launch: ids of a fixed capacity (8), the pairs to copy (5) read from a device tensor; the
    stale ids past them (pointing at blocks that must stay untouched) are not read."""
    torch.manual_seed(0)
    src = [torch.randn(2, 24, 3, 2, 2) for _ in range(2)]
    dst = [torch.zeros(2, 17, 3, 2, 2) for _ in range(2)]
    src_ids, dst_ids = torch.tensor([5, 0, 23, 7, 8, 1, 2, 3]), torch.tensor([16, 3, 0, 9, 4, 10, 11, 12])
    expected = _expected(dst, src, dst_ids[:5], src_ids[:5], range(2))
    copy_blocks(PoolPointers.of(dst, src), dst_ids, src_ids, None, tile, pair_count=torch.tensor([5]))
    assert all(torch.equal(d.view(torch.uint8), e) for d, e in zip(dst, expected))
    copy_blocks(PoolPointers.of(dst, src), dst_ids, src_ids, None, tile, pair_count=torch.tensor([0]))
    assert all(torch.equal(d.view(torch.uint8), e) for d, e in zip(dst, expected))


def test_tile_from_the_environment(monkeypatch):
    monkeypatch.setenv("MESHSERVE_BLOCK_COPY_TILE", "32768,2,8")
    assert CopyTile.from_env() == CopyTile(32768, 2, 8)
    monkeypatch.setenv("MESHSERVE_BLOCK_COPY_TILE", "32768,2")
    with pytest.raises(ValueError, match="chunk_bytes,pairs,warps"):
        CopyTile.from_env()
    monkeypatch.delenv("MESHSERVE_BLOCK_COPY_TILE")
    assert CopyTile.from_env() == CopyTile()


def test_blocks_of_an_odd_byte_count_go_by_bytes():
    src = [torch.randint(0, 255, (2, 9, 3, 1, 1), dtype=torch.uint8) for _ in range(2)]
    dst = [torch.zeros(2, 5, 3, 1, 1, dtype=torch.uint8) for _ in range(2)]
    pointers = PoolPointers.of(dst, src)
    assert not pointers.words and pointers.block_words == 3
    copy_blocks(pointers, torch.tensor([4, 0]), torch.tensor([8, 2]))
    assert all(torch.equal(d[:, [4, 0]], s[:, [8, 2]]) for d, s in zip(dst, src))


def test_pools_it_cannot_take():
    pool = torch.zeros(2, 8, 4, 2, 6)
    assert not fits(pool, pool.to(torch.float16))  # dtypes differ
    assert not fits(pool, torch.zeros(2, 8, 4, 2, 8))  # block shapes differ
    assert not fits(pool[:, :, :2], pool[:, :, :2])  # blocks not dense


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_gpu_copies_llama_blocks_like_index_copy(dtype):
    """Llama-3.1-8B's block (16 tokens x 8 KV heads x 128) in 4 layers' pools of 1,024 and 800 blocks, 300
    scattered ids, all layers and one."""
    g = torch.Generator().manual_seed(1)
    src = [torch.randn(2, 1024, 16, 8, 128, generator=g).to("cuda", dtype) for _ in range(4)]
    dst = [torch.zeros(2, 800, 16, 8, 128, device="cuda", dtype=dtype) for _ in range(4)]
    src_ids = torch.randperm(1024, generator=g)[:300].cuda()
    dst_ids = torch.randperm(800, generator=g)[:300].cuda()
    pointers = PoolPointers.of(dst, src)
    for layers, tile in ((range(2, 3), None), (None, None), (None, CopyTile(32768, 4, 8))):
        expected = _expected(dst, src, dst_ids, src_ids, range(4) if layers is None else layers)
        copy_blocks(pointers, dst_ids, src_ids, layers, tile)
        assert all(torch.equal(d.view(torch.uint8), e) for d, e in zip(dst, expected))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_replays_copy_each_reads_blocks():
    """BlockCopyGraphs: reads of 3, 16 (the first bucket), 17 and 300 blocks replay three graphs, each read's own
    blocks copied and nothing else (a bucket replayed again with fewer pairs than its last read)."""
    from meshserve.kernels.block_copy_graph import BlockCopyGraphs, bucket

    g = torch.Generator().manual_seed(2)
    src = [torch.randn(2, 1024, 16, 8, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(3)]
    dst = [torch.zeros(2, 800, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    graphs = BlockCopyGraphs(PoolPointers.of(dst, src), torch.device("cuda"), 1024)
    for n in (3, 16, 17, 300, 9, 290):
        src_ids = torch.randperm(1024, generator=g)[:n].tolist()
        dst_ids = torch.randperm(800, generator=g)[:n].tolist()
        expected = _expected(dst, src, dst_ids, src_ids, range(3))
        graphs(dst_ids, src_ids)
        torch.cuda.synchronize()
        assert all(torch.equal(d.view(torch.uint8), e) for d, e in zip(dst, expected)), n
    assert sorted(graphs._graphs) == [16, 32, 512] == sorted({bucket(n) for n in (3, 16, 17, 300)})
    before = [d.clone() for d in dst]
    for bad in ([4, 1024], [-1, 4]):
        with pytest.raises(IndexError, match="out of range"):
            graphs([0, 1], bad)
    torch.cuda.synchronize()
    assert all(torch.equal(d, b) for d, b in zip(dst, before))  # nothing copied


_SCRIPT = COMPILE_SM90_PRELUDE + """
from meshserve.kernels.triton_block_copy import _copy_blocks_kernel
sig = {"dst_bases_ptr": "*i64", "src_bases_ptr": "*i64", "dst_ids_ptr": "*i64", "src_ids_ptr": "*i64",
       "count_ptr": "*i64"}
for words, chunk, pairs, counted in ((True, 4096, 1, False), (False, 4096, 1, False), (True, 2048, 4, True)):
    compile_sm90(_copy_blocks_kernel, sig, {"WORDS": words, "CHUNK": chunk, "PAIRS": pairs, "COUNTED": counted}, 4, 1)
print("compiled")
"""


def test_kernel_compiles_for_sm90():
    assert_compiles_for_sm90(_SCRIPT)
