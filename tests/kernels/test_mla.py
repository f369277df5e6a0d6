"""MLA attention: the absorbed form equals the expanded one (kernels/mla_ref.py), and the Triton kernels
(kernels/triton_mla.py) equal the reference: in the Triton CPU interpreter on tiny shapes when triton is
installed without CUDA, on the GPU (`-m gpu`) at DeepSeek's shapes (R = 512, P = 64, 16 or 128 heads).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.kernels.mla_ref import gather_latent_ref, mla_decode_ref, mla_prefill_ref, write_latent_ref

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _meta(q_lens: list[int], seq_lens: list[int], block_size: int, num_blocks: int, device="cpu", seed=0):
    """Metadata for sequences on shuffled (non-contiguous) blocks; slots of the new tokens."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots, used = [], [], 0
    width = max(-(-s // block_size) for s in seq_lens)
    for q, s in zip(q_lens, seq_lens):
        n = -(-s // block_size)
        blocks = perm[used:used + n]
        used += n
        tables.append(blocks + [0] * (width - n))
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(s - q, s)]
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)
    return AttentionMetadata(slot_mapping=t(slots), query_start_loc=t(starts), seq_lens=t(seq_lens),
                             block_tables=t(tables), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
                             query_start_loc_cpu=starts, seq_lens_cpu=list(seq_lens))


def _problem(heads, nope, rope, v_dim, rank, q_lens, seq_lens, block_size=4, dtype=torch.float32, device="cpu"):
    g = torch.Generator(device="cpu").manual_seed(1)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    meta = _meta(q_lens, seq_lens, block_size, num_blocks, device)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    cache = rnd(1, num_blocks, block_size, 1, rank + rope)  # context rows already cached
    tokens = sum(q_lens)
    q_nope, q_pe, kv_c, k_pe = rnd(tokens, heads, nope), rnd(tokens, heads, rope), rnd(tokens, rank), rnd(tokens, rope)
    kv_b = rnd(heads * (nope + v_dim), rank) * rank**-0.5
    return meta, cache, q_nope, q_pe, kv_c, k_pe, kv_b


def _absorbed(q_nope, q_pe, cache, kv_b, meta, scale, decode):
    heads, nope, rank = q_nope.shape[1], q_nope.shape[2], kv_b.shape[1]
    w = kv_b.view(heads, -1, rank)
    q_lat = torch.einsum("thn,hnr->thr", q_nope, w[:, :nope])
    o_lat = decode(q_lat, q_pe, cache, meta, scale)
    return torch.einsum("thr,hvr->thv", o_lat, w[:, nope:])


def test_absorbed_equals_expanded_with_prefix_and_chunks():
    """The weight-absorbed attention over latents is the expanded attention (any q_len, causal, prefix)."""
    meta, cache, q_nope, q_pe, kv_c, k_pe, kv_b = _problem(4, 16, 8, 24, 32, q_lens=[1, 5, 3], seq_lens=[9, 5, 12])
    write_latent_ref(kv_c, k_pe, cache, meta.slot_mapping)
    expanded = mla_prefill_ref(q_nope, q_pe, cache, kv_b, meta, 0.3)
    absorbed = _absorbed(q_nope, q_pe, cache, kv_b, meta, 0.3, mla_decode_ref)
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)


def test_write_latent_skips_padding_slots():
    cache = torch.zeros(1, 2, 4, 1, 6)
    write_latent_ref(torch.ones(3, 4), torch.full((3, 2), 2.0), cache, torch.tensor([5, -1, 0]))
    rows = cache.view(-1, 6)
    assert rows[5].tolist() == [1, 1, 1, 1, 2, 2] and rows[0].tolist() == [1, 1, 1, 1, 2, 2]
    assert rows.abs().sum() == 2 * 8  # nothing else written
    assert torch.equal(gather_latent_ref(cache, torch.tensor([1, 0]), 6)[1], rows[5])


def _check_triton(heads, rank, rope, seq_lens, dtype, device, num_splits, block_size=16, atol=1e-4, prefetch=False,
                  tile=None, transposed=False, pipelined=False):
    from meshserve.kernels import triton_mla

    q_lens = [1] * len(seq_lens)
    meta, cache, _, q_pe, kv_c, k_pe, _ = _problem(heads, 8, rope, 8, rank, q_lens, seq_lens, block_size, dtype,
                                                   device)
    q_lat = torch.randn(len(seq_lens), heads, rank, device=device, dtype=dtype)
    ref_cache = cache.clone()
    triton_mla.write_latent(kv_c, k_pe, cache, meta.slot_mapping)
    write_latent_ref(kv_c, k_pe, ref_cache, meta.slot_mapping)
    assert torch.equal(cache, ref_cache)
    scale = (rank + rope) ** -0.5
    got = triton_mla.mla_decode(q_lat, q_pe, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                scale, meta.max_seq_len, num_splits=num_splits, prefetch=prefetch, tile=tile,
                                transposed=transposed, pipelined=pipelined)
    ref = mla_decode_ref(q_lat.float(), q_pe.float(), cache.float(), meta, scale)
    torch.testing.assert_close(got.float(), ref, atol=atol, rtol=atol)


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="interpreter test runs only without CUDA")
def test_mla_split_rule_fills_the_sms_below_one_program_per_sm():
    """132 SMs (H100/H200): the generic rule left batches of 67-131 at one program per sequence; the MLA rule
    aims at about two programs per SM until the batch alone gives one per SM (powers of two, capped by length)."""
    pytest.importorskip("triton")
    from meshserve.kernels.triton_attention import decode_num_splits
    from meshserve.kernels.triton_mla import mla_num_splits

    sms, bound = 132, 163840
    assert [mla_num_splits(b, bound, 32, sms) for b in (1, 16, 64, 80, 128, 132, 256)] == [64, 16, 4, 4, 2, 1, 1]
    assert [decode_num_splits(b, 1, bound, 32, sms) for b in (64, 80, 128)] == [4, 1, 1]
    assert mla_num_splits(1, 800, 32, sms) == 2 ** 2  # splits of at least 256 tokens of the context bound
    assert mla_num_splits(4, 200, 32, sms) == 1


def test_decode_choice_follows_the_h200_sweep():
    """Balanced kernel from 64 rows on (it won or tied at 64, 96 and 256 sequences), the split kernel below
    (batch 1: 13.2 us against 15.5); a forced choice wins; 4 warps once the split grid fills the SMs."""
    pytest.importorskip("triton")
    from meshserve.kernels.mla_decode_choice import use_balanced
    from meshserve.kernels.triton_mla import _decode_config

    assert [use_balanced(b, None) for b in (1, 32, 63, 64, 96, 256)] == [False] * 3 + [True] * 3
    assert use_balanced(1, True) and not use_balanced(256, False)
    assert _decode_config(512, 2) == (32, 8)  # no grid given: the wide-acc default
    assert _decode_config(512, 2, 16, 132) == (32, 8) and _decode_config(512, 2, 256, 132) == (32, 4)
    assert _decode_config(32, 4, 1, 132) == (64, 4)  # small ranks: 4 warps at any grid


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("loop", ["plain", "prefetch", "transposed"])
def test_triton_mla_decode_in_interpreter(num_splits, loop):
    # 20 heads: two head blocks, the second partly masked; rope 8 pads to 16; contexts cross several tiles
    # (prefetch: tiles of 16 rows over blocks of 4, so a split's last tile is followed by the next split's)
    _check_triton(20, 32, 8, [1, 70, 33], torch.float32, "cpu", num_splits, block_size=4,
                  prefetch=loop == "prefetch", transposed=loop == "transposed",
                  tile=None if loop == "plain" else (16, 4, 1))


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_triton_mla_decode_gpu(heads, num_splits):
    """DeepSeek's shapes (R = 512, P = 64): V2-Lite's 16 heads, V3's 128 at TP=1, bf16 and fp32."""
    lens = [1, 17, 300, 1029, 4000]
    _check_triton(heads, 512, 64, lens, torch.bfloat16, "cuda", num_splits, atol=2e-2)
    _check_triton(heads, 512, 64, lens[:3], torch.float32, "cuda", num_splits, atol=1e-4)
    for tile in (None, (16, 4, 1), (32, 8, 1)):  # the prefetching loop (kernels/triton_mla_prefetch.py)
        _check_triton(heads, 512, 64, lens, torch.bfloat16, "cuda", num_splits, atol=2e-2, prefetch=True, tile=tile)
    for tile in (None, (64, 8, 2)):  # the transposed loop (kernels/triton_mla_transposed.py)
        _check_triton(heads, 512, 64, lens, torch.bfloat16, "cuda", num_splits, atol=2e-2, transposed=True, tile=tile)


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
def test_triton_mla_decode_padding_rows_gpu():
    """CUDA-graph padding: rows with seq_len 0 and slot -1 write nothing to the cache and give zeros."""
    from meshserve.kernels import triton_mla

    cache = torch.randn(1, 8, 16, 1, 576, device="cuda", dtype=torch.bfloat16)
    before = cache.clone()
    triton_mla.write_latent(torch.randn(2, 512, device="cuda", dtype=torch.bfloat16),
                            torch.randn(2, 64, device="cuda", dtype=torch.bfloat16), cache,
                            torch.tensor([-1, -1], device="cuda"))
    assert torch.equal(cache, before)
    q = torch.randn(2, 16, 512, device="cuda", dtype=torch.bfloat16)
    out = triton_mla.mla_decode(q, torch.randn(2, 16, 64, device="cuda", dtype=torch.bfloat16), cache,
                                torch.zeros(2, 4, dtype=torch.int64, device="cuda"),
                                torch.zeros(2, dtype=torch.int64, device="cuda"),
                                torch.arange(3, device="cuda"), 0.1, 4096)
    assert out.abs().sum().item() == 0
